//! The operator's own HTTP reads (runtime pods' `/metrics`, Prometheus queries): one client that
//! follows no redirect, and bodies read up to a bound, so a pod or a server named in a user's
//! spec can neither send the operator elsewhere nor make it buffer without end.

use std::time::Duration;

/// The largest body read from a scrape or a Prometheus answer (a runtime's `/metrics` is a few
/// KiB; an instant query of one series, less).
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// Errors of a bounded body read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("the answer is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("reading the answer: {0}")]
    Http(#[source] reqwest::Error),
}

/// The client for scrapes and queries: no redirects (a redirect could lead to any host),
/// connections bounded in time (each request also has its own timeout).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(2))
        .build()
        // Only a TLS backend can fail to build, and this client has none.
        .unwrap_or_default()
}

/// The body of `response` as text (invalid UTF-8 replaced: both kinds of answer are parsed
/// as text), or `TooLarge` once it passes `limit` bytes (announced or sent).
pub async fn read_bounded(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<String, ReadError> {
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(ReadError::TooLarge { limit });
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| ReadError::Http(e.without_url()))?
    {
        if body.len() + chunk.len() > limit {
            return Err(ReadError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Whether `host` is one of `allowed`: an exact name, or `*.suffix` for any name under it.
pub fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    allowed.iter().any(|pattern| {
        let pattern = pattern.trim().to_ascii_lowercase();
        match pattern.strip_prefix("*.") {
            Some(suffix) => host
                .strip_suffix(suffix)
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
            None => !pattern.is_empty() && host == pattern,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Serves one canned answer per connection.
    async fn server(answer: Vec<u8>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = stream.read(&mut buf).await;
                    let _ = stream.write_all(&answer).await;
                });
            }
        });
        format!("http://{addr}/")
    }

    fn chunked(size: usize) -> Vec<u8> {
        let mut answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        let chunk = vec![b'x'; 64 << 10];
        let mut left = size;
        while left > 0 {
            let n = left.min(chunk.len());
            answer.extend_from_slice(format!("{n:x}\r\n").as_bytes());
            answer.extend_from_slice(&chunk[..n]);
            answer.extend_from_slice(b"\r\n");
            left -= n;
        }
        answer.extend_from_slice(b"0\r\n\r\n");
        answer
    }

    /// Found in review: scrape and Prometheus bodies were read whole, whatever their size.
    #[tokio::test]
    async fn bodies_past_the_bound_are_refused_announced_or_streamed() {
        let http = client();
        let small = server(chunked(1000)).await;
        let body = read_bounded(http.get(&small).send().await.unwrap(), 4096).await;
        assert_eq!(body.unwrap().len(), 1000);

        let streamed = server(chunked(300 << 10)).await;
        let body = read_bounded(http.get(&streamed).send().await.unwrap(), 256 << 10).await;
        assert!(matches!(body, Err(ReadError::TooLarge { limit }) if limit == 256 << 10));

        let announced =
            server(b"HTTP/1.1 200 OK\r\nContent-Length: 999999999\r\n\r\nxx".to_vec()).await;
        let body = read_bounded(http.get(&announced).send().await.unwrap(), 4096).await;
        assert!(matches!(body, Err(ReadError::TooLarge { .. })));
    }

    #[tokio::test]
    async fn redirects_are_not_followed() {
        let elsewhere = server(chunked(10)).await;
        let redirect = server(
            format!("HTTP/1.1 302 Found\r\nLocation: {elsewhere}\r\nContent-Length: 0\r\n\r\n")
                .into_bytes(),
        )
        .await;
        let answer = client().get(&redirect).send().await.unwrap();
        assert_eq!(answer.status().as_u16(), 302);
    }

    #[test]
    fn hosts_match_exactly_or_under_a_wildcard_suffix() {
        let allowed = vec![
            "prometheus.monitoring.svc".to_owned(),
            "*.thanos.example.com".to_owned(),
        ];
        assert!(host_allowed("prometheus.monitoring.svc", &allowed));
        assert!(host_allowed("Prometheus.Monitoring.svc.", &allowed));
        assert!(host_allowed("q.thanos.example.com", &allowed));
        assert!(!host_allowed("thanos.example.com", &allowed));
        assert!(!host_allowed("evilthanos.example.com", &allowed));
        assert!(!host_allowed("prometheus.monitoring.svc.evil.io", &allowed));
        assert!(!host_allowed("169.254.169.254", &allowed));
        assert!(!host_allowed("anything", &[]));
    }
}
