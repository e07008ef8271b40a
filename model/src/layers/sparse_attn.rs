//! The attention core shared by every layer kind (spec §5.6): single-latent MQA over a gathered
//! key set, with a per-head learned sink in the softmax denominator. The key and the value are the
//! same vector.

/// `out[h] = Σ_u p[h,u] · keys[u]`, `p[h,u] = exp(s[h,u] − M_h) / (Σ_u' exp(s[h,u'] − M_h) +
/// exp(sink_h − M_h))`, `s = scale · q_h · keys[u]`. `q` and `out` are `[H, D]`, `keys` `[U, D]`.
pub fn attend(q: &[f32], keys: &[f32], sink: &[f32], scale: f32, out: &mut [f32]) {
    let h = sink.len();
    let d = q.len() / h;
    let u = keys.len() / d;
    let mut scores = vec![0.0f32; h * u];
    // SAFETY: dimensions and strides describe the three dense row-major buffers above.
    unsafe {
        // scores[h, u] = q[h, :] · keys[u, :]
        matrixmultiply::sgemm(
            h,
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
    for (row, &s) in scores.chunks_exact_mut(u).zip(sink) {
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        let denom = sum + (s - max).exp();
        row.iter_mut().for_each(|v| *v /= denom);
    }
    // SAFETY: out[h, :] = scores[h, :] · keys
    unsafe {
        matrixmultiply::sgemm(
            h,
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

    #[test]
    fn matches_direct_softmax_with_sink() {
        let (h, d, u) = (3, 4, 5);
        let q: Vec<f32> = (0..h * d).map(|i| (i as f32 * 0.3).sin()).collect();
        let keys: Vec<f32> = (0..u * d).map(|i| (i as f32 * 0.7).cos()).collect();
        let sink = [0.5f32, -1.0, 3.0];
        let mut out = vec![0.0; h * d];
        attend(&q, &keys, &sink, 0.5, &mut out);
        for hh in 0..h {
            let s: Vec<f64> = (0..u)
                .map(|j| 0.5 * (0..d).map(|c| q[hh * d + c] as f64 * keys[j * d + c] as f64).sum::<f64>())
                .collect();
            let denom: f64 = s.iter().map(|v| v.exp()).sum::<f64>() + (sink[hh] as f64).exp();
            for c in 0..d {
                let want: f64 = (0..u).map(|j| s[j].exp() / denom * keys[j * d + c] as f64).sum();
                assert!((out[hh * d + c] as f64 - want).abs() < 1e-5, "head {hh} ch {c}");
            }
        }
    }

    /// A very negative sink is no sink: the weights sum to one.
    #[test]
    fn negligible_sink_gives_plain_softmax() {
        let q = vec![1.0f32; 2];
        let keys = vec![1.0f32, 1.0, 1.0, 1.0];
        let mut out = vec![0.0; 2];
        attend(&q, &keys, &[-1e4], 1.0, &mut out);
        assert!((out[0] - 1.0).abs() < 1e-6);
    }
}
