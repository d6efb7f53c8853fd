//! Pure: weight pruning. Magnitude pruning zeroes the smallest weights of a tensor;
//! semi-structured 2:4 zeroes the two smallest of every four consecutive weights of a row
//! (the pattern sparse tensor cores accelerate).

use serde::{Deserialize, Serialize};

/// A pruning request.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "method")]
pub enum Pruning {
    #[serde(rename = "magnitude")]
    Magnitude { sparsity: f64 },
    #[serde(rename = "semi-structured-2:4")]
    SemiStructured24,
}

impl std::str::FromStr for Pruning {
    type Err = String;

    /// `magnitude:0.3` or `2:4`.
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "2:4" || s == "semi-structured-2:4" {
            return Ok(Self::SemiStructured24);
        }
        let sparsity = s
            .strip_prefix("magnitude:")
            .ok_or_else(|| {
                format!("{s:?}: expected magnitude:<sparsity> (e.g. magnitude:0.3) or 2:4")
            })?
            .parse::<f64>()
            .map_err(|e| format!("{s:?}: sparsity: {e}"))?;
        if !(0.0..=0.95).contains(&sparsity) {
            return Err(format!("{s:?}: sparsity must be within 0–0.95"));
        }
        Ok(Self::Magnitude { sparsity })
    }
}

/// The magnitude below which weights are zeroed to reach `sparsity`.
pub fn magnitude_threshold(weights: &[f32], sparsity: f64) -> f32 {
    let k = ((weights.len() as f64) * sparsity).floor() as usize;
    if k == 0 || weights.is_empty() {
        return 0.0;
    }
    let mut magnitudes: Vec<f32> = weights.iter().map(|w| w.abs()).collect();
    let k = k.min(magnitudes.len() - 1);
    let (_, kth, _) = magnitudes.select_nth_unstable_by(k, f32::total_cmp);
    *kth
}

/// Zeroes every weight whose magnitude is below `threshold`.
pub fn apply_threshold(weights: &mut [f32], threshold: f32) {
    for w in weights.iter_mut().filter(|w| w.abs() < threshold) {
        *w = 0.0;
    }
}

/// Zeroes the two smallest-magnitude weights of every group of four along each row.
/// Rows whose length is not a multiple of 4 keep their tail.
pub fn two_of_four(weights: &mut [f32], row_len: usize) {
    for row in weights.chunks_mut(row_len.max(1)) {
        for group in row.chunks_exact_mut(4) {
            let mut order = [0usize, 1, 2, 3];
            order.sort_by(|&a, &b| group[a].abs().total_cmp(&group[b].abs()));
            group[order[0]] = 0.0;
            group[order[1]] = 0.0;
        }
    }
}

/// Fraction of exact zeros.
pub fn sparsity(weights: &[f32]) -> f64 {
    if weights.is_empty() {
        return 0.0;
    }
    weights.iter().filter(|w| **w == 0.0).count() as f64 / weights.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magnitude_reaches_the_requested_sparsity() {
        let mut w: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 1000) as f32 - 500.0)
            .collect();
        let t = magnitude_threshold(&w, 0.3);
        apply_threshold(&mut w, t);
        let s = sparsity(&w);
        assert!((s - 0.3).abs() < 0.01, "{s}");
    }

    #[test]
    fn two_of_four_keeps_the_two_largest_of_each_group() {
        let mut w = vec![0.1, -4.0, 3.0, 0.2, 5.0, 6.0, -7.0, 8.0];
        two_of_four(&mut w, 8);
        assert_eq!(w, vec![0.0, -4.0, 3.0, 0.0, 0.0, 0.0, -7.0, 8.0]);
        assert_eq!(sparsity(&w), 0.5);
    }

    #[test]
    fn parses_cli_forms() {
        assert_eq!("2:4".parse::<Pruning>(), Ok(Pruning::SemiStructured24));
        assert_eq!(
            "magnitude:0.3".parse::<Pruning>(),
            Ok(Pruning::Magnitude { sparsity: 0.3 })
        );
        assert!("magnitude:2".parse::<Pruning>().is_err());
        assert!("random".parse::<Pruning>().is_err());
    }
}
