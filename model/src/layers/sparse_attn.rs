//! The attention core shared by every layer kind (spec §5.6): single-latent MQA over a gathered
//! key set, with a per-head learned sink in the softmax denominator. The key and the value are the
//! same vector.
//!
//! Queries are processed in blocks: consecutive tokens of a sequence share most of their keys
//! (their windows overlap, their compressed entries mostly coincide), so a block attends to the
//! union of its queries' keys with a per-query mask. Two GEMMs per block replace two tiny ones per
//! token; masked keys get probability exactly 0, so the math is the per-token math.

/// `out[b, h] = Σ_u p[b,h,u] · keys[u]` with
/// `p[b,h,u] = exp(s − M) / (Σ_allowed exp(s − M) + exp(sink_h − M))`, `s = scale · q[b,h] · keys[u]`,
/// `M` the maximum over allowed keys, and keys not `allowed[b·U + u]` excluded.
/// `q` and `out` are `[B, H, D]`, `keys` `[U, D]`, `allowed` `[B, U]`.
pub fn attend_block(q: &[f32], keys: &[f32], allowed: &[bool], sink: &[f32], scale: f32, d: usize, out: &mut [f32]) {
    let h = sink.len();
    let u = keys.len() / d;
    let rows = q.len() / d; // B·H
    assert_eq!(allowed.len(), rows / h * u, "mask is not [queries, keys]");
    let mut scores = vec![0.0f32; rows * u];
    // SAFETY: dimensions and strides describe the dense row-major buffers above.
    unsafe {
        // scores[r, u] = q[r, :] · keys[u, :]
        matrixmultiply::sgemm(
            rows,
            d,
            u,
            scale,
            q.as_ptr(),
            d as isize,
            1,
            keys.as_ptr(),
            1,
            d as isize,
            0.0,
            scores.as_mut_ptr(),
            u as isize,
            1,
        );
    }
    for (r, row) in scores.chunks_exact_mut(u).enumerate() {
        let mask = &allowed[(r / h) * u..(r / h + 1) * u];
        let max = row.iter().zip(mask).filter(|(_, a)| **a).map(|(v, _)| *v).fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for (v, &a) in row.iter_mut().zip(mask) {
            *v = if a { (*v - max).exp() } else { 0.0 };
            sum += *v;
        }
        let denom = sum + (sink[r % h] - max).exp();
        row.iter_mut().for_each(|v| *v /= denom);
    }
    // SAFETY: out[r, :] = scores[r, :] · keys
    unsafe {
        matrixmultiply::sgemm(
            rows,
            u,
            d,
            1.0,
            scores.as_ptr(),
            u as isize,
            1,
            keys.as_ptr(),
            d as isize,
            1,
            0.0,
            out.as_mut_ptr(),
            d as isize,
            1,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct softmax with sink, in f64, over the allowed keys only.
    fn reference(q: &[f32], keys: &[f32], allowed: &[bool], sink: &[f32], scale: f64, d: usize) -> Vec<f64> {
        let h = sink.len();
        let u = keys.len() / d;
        let b = allowed.len() / u;
        let mut out = vec![0.0; b * h * d];
        for bb in 0..b {
            for hh in 0..h {
                let qv = &q[(bb * h + hh) * d..][..d];
                let idx: Vec<usize> = (0..u).filter(|&j| allowed[bb * u + j]).collect();
                let s: Vec<f64> = idx
                    .iter()
                    .map(|&j| scale * (0..d).map(|c| qv[c] as f64 * keys[j * d + c] as f64).sum::<f64>())
                    .collect();
                let denom: f64 = s.iter().map(|v| v.exp()).sum::<f64>() + (sink[hh] as f64).exp();
                for c in 0..d {
                    out[(bb * h + hh) * d + c] =
                        idx.iter().zip(&s).map(|(&j, sv)| sv.exp() / denom * keys[j * d + c] as f64).sum();
                }
            }
        }
        out
    }

    #[test]
    fn matches_direct_softmax_with_sink_and_mask() {
        let (b, h, d, u) = (3, 2, 4, 5);
        let q: Vec<f32> = (0..b * h * d).map(|i| (i as f32 * 0.3).sin()).collect();
        let keys: Vec<f32> = (0..u * d).map(|i| (i as f32 * 0.7).cos()).collect();
        let allowed: Vec<bool> = (0..b * u).map(|i| i % 3 != 1 || i % u == 0).collect();
        let sink = [0.5f32, -1.0];
        let mut out = vec![0.0; b * h * d];
        attend_block(&q, &keys, &allowed, &sink, 0.5, d, &mut out);
        for (i, (got, want)) in out.iter().zip(reference(&q, &keys, &allowed, &sink, 0.5, d)).enumerate() {
            assert!((*got as f64 - want).abs() < 1e-5, "element {i}: {got} vs {want}");
        }
    }

    /// A very negative sink is no sink: the weights sum to one.
    #[test]
    fn negligible_sink_gives_plain_softmax() {
        let q = vec![1.0f32; 2];
        let keys = vec![1.0f32, 1.0, 1.0, 1.0];
        let mut out = vec![0.0; 2];
        attend_block(&q, &keys, &[true, true], &[-1e4], 1.0, 2, &mut out);
        assert!((out[0] - 1.0).abs() < 1e-6);
    }
}
