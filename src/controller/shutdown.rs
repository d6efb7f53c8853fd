//! Stopping within the pod's grace period, whatever the API server does meanwhile.
//!
//! kube-runtime's graceful shutdown waits for running reconciles, and its runner waits for
//! its store to sync before it can finish at all: a controller whose watches never listed
//! (the API answering 403 or 5xx) never stops. Found on a real API server, where a replica
//! stopped while its permissions were missing hung until SIGKILL. So every step of the
//! shutdown is bounded, and a watchdog ends the process at the drain deadline.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Runs `work` to its end, but for no longer than `grace` after `stop` fires: None when it
/// was abandoned (dropped, which cancels what it was doing).
pub async fn within_grace<F: Future>(
    work: F,
    stop: &CancellationToken,
    grace: Duration,
) -> Option<F::Output> {
    let deadline = async {
        stop.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        out = work => Some(out),
        () = deadline => None,
    }
}

/// Ends the process `drain` after `stop` fires if it is still running then: the last
/// resort, so a replica always exits before the kubelet's SIGKILL.
pub fn watchdog(stop: CancellationToken, drain: Duration) {
    tokio::spawn(async move {
        stop.cancelled().await;
        tokio::time::sleep(drain).await;
        tracing::error!(
            ?drain,
            "shutdown did not finish within the drain timeout; exiting now"
        );
        std::process::exit(1);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn work_that_ends_is_awaited_whole() {
        let stop = CancellationToken::new();
        stop.cancel();
        let slow = async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            7
        };
        assert_eq!(
            within_grace(slow, &stop, Duration::from_secs(5)).await,
            Some(7)
        );
    }

    /// What a controller whose store never synced does on graceful shutdown.
    #[tokio::test(start_paused = true)]
    async fn work_that_never_ends_is_abandoned_at_the_grace() {
        let stop = CancellationToken::new();
        let started = tokio::time::Instant::now();
        let canceller = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(10)).await;
            canceller.cancel();
        });
        let out = within_grace(std::future::pending::<()>(), &stop, Duration::from_secs(4)).await;
        assert_eq!(out, None);
        assert_eq!(started.elapsed(), Duration::from_secs(14));
    }

    #[tokio::test(start_paused = true)]
    async fn no_stop_no_deadline() {
        let stop = CancellationToken::new();
        let long = async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            "done"
        };
        assert_eq!(
            within_grace(long, &stop, Duration::from_secs(1)).await,
            Some("done")
        );
    }
}
