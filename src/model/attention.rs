//! Self-attention of a packed batch in one pass: every sentence's heads over its own tokens.
//!
//! Written with candle's ops, a sentence costs ~25 tensor ops a layer (slices, transposes,
//! two matmuls, a softmax of five ops), each allocating — per sentence, so a batch paid them
//! as many times as it held sentences. Here one op walks the packed q, k and v in place.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::{Result, contiguous_f32};

/// `softmax(q kᵀ / √d) v` for each sentence `(start, len)` of `spans` and each of `heads`
/// heads; q, k and v are `[tokens, hidden]`, and so is the result.
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    spans: &[(usize, usize)],
    heads: usize,
) -> Result<Tensor> {
    Ok(q.contiguous()?.apply_op3_no_bwd(
        &k.contiguous()?,
        &v.contiguous()?,
        &Attend { spans, heads },
    )?)
}

struct Attend<'a> {
    spans: &'a [(usize, usize)],
    heads: usize,
}

impl CustomOp3 for Attend<'_> {
    fn name(&self) -> &'static str {
        "kasmina-attend"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let q = contiguous_f32(s1, l1, self.name())?;
        let k = contiguous_f32(s2, l2, self.name())?;
        let v = contiguous_f32(s3, l3, self.name())?;
        let (tokens, hidden) = l1.shape().dims2()?;
        if l2.shape() != l1.shape() || l3.shape() != l1.shape() {
            candle_core::bail!("{}: q, k and v must have one shape", self.name());
        }
        if self.heads == 0 || !hidden.is_multiple_of(self.heads) {
            candle_core::bail!(
                "{}: {hidden} is not {} whole heads",
                self.name(),
                self.heads
            );
        }
        if self.spans.iter().any(|&(start, len)| start + len > tokens) {
            candle_core::bail!("{}: a span ends past {tokens} tokens", self.name());
        }
        let d = hidden / self.heads;
        let scale = 1.0 / (d as f32).sqrt();
        let mut out = vec![0f32; tokens * hidden];
        let longest = self.spans.iter().map(|s| s.1).max().unwrap_or(0);
        let mut scores = vec![0f32; longest];
        for &(start, len) in self.spans {
            for head in 0..self.heads {
                let at = |t: usize| (start + t) * hidden + head * d;
                for i in 0..len {
                    let qi = &q[at(i)..at(i) + d];
                    let scores = &mut scores[..len];
                    for (j, s) in scores.iter_mut().enumerate() {
                        *s = dot(qi, &k[at(j)..at(j) + d]) * scale;
                    }
                    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0f32;
                    for s in scores.iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    let oi = &mut out[at(i)..at(i) + d];
                    for (j, &p) in scores.iter().enumerate() {
                        let p = p / sum;
                        for (o, &x) in oi.iter_mut().zip(&v[at(j)..at(j) + d]) {
                            *o += p * x;
                        }
                    }
                }
            }
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// A dot product in 8 independent lanes, so it vectorizes (one running sum would not).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// Softmax over the last dimension, as the replaced form computed it.
    fn softmax_last_dim(x: &Tensor) -> Tensor {
        let max = x.max_keepdim(candle_core::D::Minus1).unwrap();
        let e = x.broadcast_sub(&max).unwrap().exp().unwrap();
        e.broadcast_div(&e.sum_keepdim(candle_core::D::Minus1).unwrap())
            .unwrap()
    }

    /// The candle-ops form this op replaced, per sentence.
    fn reference(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        spans: &[(usize, usize)],
        heads: usize,
    ) -> Tensor {
        let h = q.dim(1).unwrap();
        let d = h / heads;
        let split = |t: &Tensor, start, len| {
            t.narrow(0, start, len)
                .unwrap()
                .reshape((len, heads, d))
                .unwrap()
                .transpose(0, 1)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let contexts: Vec<Tensor> = spans
            .iter()
            .map(|&(start, len)| {
                let (q, k, v) = (
                    split(q, start, len),
                    split(k, start, len),
                    split(v, start, len),
                );
                let scores = (q.matmul(&k.t().unwrap().contiguous().unwrap()).unwrap()
                    * (1.0 / (d as f64).sqrt()))
                .unwrap();
                softmax_last_dim(&scores)
                    .matmul(&v)
                    .unwrap()
                    .transpose(0, 1)
                    .unwrap()
                    .contiguous()
                    .unwrap()
                    .reshape((len, h))
                    .unwrap()
            })
            .collect();
        Tensor::cat(&contexts, 0).unwrap()
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2000) as f32 / 250.0 - 4.0
            })
            .collect()
    }

    #[test]
    fn one_pass_equals_candles_ops_per_sentence_and_head() {
        // Sentences of 1, 2, 13 and 40 tokens; head widths of 32 (all-MiniLM) and 12 (a tail
        // after the 8-lane chunks).
        let spans = [(0, 13), (13, 1), (14, 40), (54, 2)];
        let tokens = 56;
        for (hidden, heads) in [(384, 12), (48, 4)] {
            let t = |seed| {
                Tensor::from_vec(
                    values(tokens * hidden, seed),
                    (tokens, hidden),
                    &Device::Cpu,
                )
                .unwrap()
            };
            let (q, k, v) = (t(1), t(2), t(3));
            let ours = attend(&q, &k, &v, &spans, heads).unwrap();
            let theirs = reference(&q, &k, &v, &spans, heads);
            let worst = (ours - theirs)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(worst < 1e-4, "hidden {hidden}: worst difference {worst}");
        }
    }

    #[test]
    fn inputs_it_cannot_attend_are_refused() {
        let t = Tensor::zeros((4, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(
            attend(&t, &t, &t, &[(0, 5)], 2).is_err(),
            "span past the tokens"
        );
        assert!(
            attend(&t, &t, &t, &[(0, 4)], 3).is_err(),
            "8 is not 3 heads"
        );
        let other = Tensor::zeros((4, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(
            attend(&t, &other, &t, &[(0, 4)], 2).is_err(),
            "shapes differ"
        );
    }
}
