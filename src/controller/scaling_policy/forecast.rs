//! Pure: the trend forecast behind predictive scale-up — Holt's double exponential smoothing
//! (level + trend) over samples at irregular times, projected `horizon` seconds ahead. The
//! decision may only raise replicas on it, never lower them.

/// Smoothing of the level and of the trend. 0.5/0.3 follow a 10× step within a few samples
/// while a noisy flat load keeps a trend near zero.
pub const ALPHA: f64 = 0.5;
pub const BETA: f64 = 0.3;

/// The value expected `horizon` seconds after the last sample; None with fewer than three
/// samples (no trend yet) or samples out of order.
pub fn holt(samples: &[(i64, f64)], alpha: f64, beta: f64, horizon: f64) -> Option<f64> {
    if samples.len() < 3 {
        return None;
    }
    let (t0, y0) = samples[0];
    let (t1, y1) = samples[1];
    let dt = (t1 - t0) as f64;
    if dt <= 0.0 {
        return None;
    }
    let mut level = y1;
    let mut trend = (y1 - y0) / dt;
    let mut last = t1;
    for &(t, y) in &samples[2..] {
        let dt = (t - last) as f64;
        if dt <= 0.0 {
            return None;
        }
        let previous = level;
        level = alpha * y + (1.0 - alpha) * (level + trend * dt);
        trend = beta * (level - previous) / dt + (1.0 - beta) * trend;
        last = t;
    }
    Some(level + trend * horizon)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ramp_is_projected_and_a_flat_load_stays_flat() {
        let ramp: Vec<(i64, f64)> = (0..10).map(|i| (i * 5, 0.1 * i as f64)).collect();
        // 0.02 per second: 60 s after 0.9 is 2.1.
        let f = holt(&ramp, ALPHA, BETA, 60.0).unwrap();
        assert!((f - 2.1).abs() < 1e-9, "{f}");
        let flat: Vec<(i64, f64)> = (0..10).map(|i| (i * 5, 0.5)).collect();
        assert!((holt(&flat, ALPHA, BETA, 60.0).unwrap() - 0.5).abs() < 1e-12);
    }

    #[test]
    fn irregular_intervals_and_too_little_data() {
        let samples = [(0, 1.0), (5, 2.0), (20, 5.0), (25, 6.0)];
        let f = holt(&samples, ALPHA, BETA, 10.0).unwrap();
        assert!(
            (f - 8.0).abs() < 1e-9,
            "a steady 0.2/s over uneven gaps: {f}"
        );
        assert_eq!(holt(&samples[..2], ALPHA, BETA, 10.0), None);
        assert_eq!(
            holt(&[(0, 1.0), (0, 2.0), (5, 3.0)], ALPHA, BETA, 10.0),
            None
        );
    }

    #[test]
    fn a_step_raises_the_forecast_quickly() {
        let mut samples: Vec<(i64, f64)> = (0..6).map(|i| (i * 5, 0.1)).collect();
        samples.extend((6..9).map(|i| (i * 5, 1.0)));
        let f = holt(&samples, ALPHA, BETA, 30.0).unwrap();
        assert!(
            f > 1.0,
            "three samples after a 10× step the forecast is above the new level: {f}"
        );
    }
}
