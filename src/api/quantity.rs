//! Kubernetes quantities (`129e6`, `123Mi`, `1500m`) as plain numbers.

/// Parses a Kubernetes quantity into a plain number: bytes (`129e6`, `123Mi`, `1G`) or cores
/// (`1500m`, and the `n`anocores `metrics.k8s.io` reports).
pub fn parse(q: &str) -> Option<f64> {
    let q = q.trim();
    let split = q
        .find(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E')
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let factor = match suffix {
        "" => 1.0,
        "Ki" => 1024.0,
        "Mi" => 1024.0_f64.powi(2),
        "Gi" => 1024.0_f64.powi(3),
        "Ti" => 1024.0_f64.powi(4),
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "m" => 1e-3,
        "u" => 1e-6,
        "n" => 1e-9,
        "Pi" => 1024.0_f64.powi(5),
        "P" => 1e15,
        _ => return None,
    };
    Some(number.parse::<f64>().ok()? * factor)
}
