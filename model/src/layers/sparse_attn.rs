//! The attention core shared by every layer kind (spec §5.6): single-latent MQA over a key set,
//! with a per-head learned sink in the softmax denominator. The key and the value are the same
//! vector.
//!
//! Queries are processed in blocks. Consecutive tokens of a sequence share most of their keys
//! (their windows overlap; HCA entries are a common prefix), so a block attends to those shared
//! keys with two GEMMs, each query masking what it may not see by ranges. Keys that differ per
//! query (the CSA top-k picks) are attended per query and merged into the same softmax. Masked
//! keys get probability exactly 0, so the math is the per-token math.

use crate::kernels::exp_in_place;

/// What one query of a block sees among the block's shared keys: a window range, and the first
/// `prefix` keys after the `n_window` window keys (visible compressed entries).
#[derive(Clone, Debug)]
pub struct QueryKeys {
    pub window: std::ops::Range<usize>,
    pub prefix: usize,
}

/// `c[m, n] = alpha · a[m, k] · b[n, k]ᵀ` (scores: queries against keys), all row-major.
fn gemm_abt(m: usize, k: usize, n: usize, alpha: f32, a: &[f32], b: &[f32], c: &mut [f32]) {
    // SAFETY: the strides describe dense row-major buffers of the stated shapes.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            1,
            k as isize,
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// `c[m, n] = a[m, k] · b[k, n] + beta · c` (probabilities times values), all row-major.
fn gemm_ab(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], beta: f32, c: &mut [f32]) {
    // SAFETY: the strides describe dense row-major buffers of the stated shapes.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            n as isize,
            1,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// The keys of one query block.
pub struct BlockKeys {
    /// `[U, D]`: the window keys first (`n_window` rows), then any compressed entries all of the
    /// block's queries may see a prefix of.
    pub shared: Vec<f32>,
    pub n_window: usize,
    /// Each query's view of `shared`.
    pub views: Vec<QueryKeys>,
    /// `[J_b, D]` keys only query `b` sees (its CSA top-k picks; may be empty).
    pub own: Vec<Vec<f32>>,
}

/// `q` and `out` are `[B, H, D]`.
pub fn attend_block(q: &[f32], keys: &BlockKeys, sink: &[f32], scale: f32, d: usize, out: &mut [f32]) {
    let rows = keys.views.len() * sink.len();
    let u = keys.shared.len() / d;
    // The GEMMs below go through raw pointers: the shapes must hold.
    assert!(
        q.len() == rows * d
            && out.len() == rows * d
            && keys.shared.len() == u * d
            && keys.own.len() == keys.views.len(),
        "attend_block: inconsistent shapes"
    );
    assert!(keys.own.iter().all(|o| o.len() % d == 0), "attend_block: own keys are not [J, {d}]");
    SCORES.with(|buf| {
        let mut buf = buf.borrow_mut();
        if buf.len() < rows * u {
            buf.resize(rows * u, 0.0);
        }
        softmax_and_combine(q, keys, sink, scale, d, &mut buf[..rows * u], out);
    });
}

thread_local! {
    /// Scores scratch, reused across blocks: SGEMM overwrites it (beta = 0), so stale contents
    /// never matter and no zero-fill is paid per block.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Lanes of the reductions below: eight independent chains, which the compiler turns into one
/// vector register (a single running `max`/sum is one dependent operation per element).
const LANES: usize = 8;

/// Largest value (−∞ for none).
fn lanes_max(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = v.chunks_exact(LANES);
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, x| m.max(*x));
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a = a.max(*x);
        }
    }
    acc.iter().fold(tail, |m, x| m.max(*x))
}

/// Sum, in eight interleaved partial sums.
fn lanes_sum(v: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = v.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + tail
}

fn softmax_and_combine(
    q: &[f32],
    keys: &BlockKeys,
    sink: &[f32],
    scale: f32,
    d: usize,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let BlockKeys { shared, n_window, views, own } = keys;
    let n_window = *n_window;
    let h = sink.len();
    let u = shared.len() / d;
    let b = views.len();
    let rows = b * h;
    gemm_abt(rows, d, u, scale, q, shared, scores);
    let own_scores: Vec<Vec<f32>> = (0..b)
        .map(|i| {
            let j = own[i].len() / d;
            let mut s = vec![0.0f32; h * j];
            if j > 0 {
                gemm_abt(h, d, j, scale, &q[i * h * d..(i + 1) * h * d], &own[i], &mut s);
            }
            s
        })
        .collect();
    let mut own_probs = own_scores;
    for r in 0..rows {
        let (i, head) = (r / h, r % h);
        let view = &views[i];
        let row = &mut scores[r * u..(r + 1) * u];
        let j = own[i].len() / d;
        let own_row = &mut own_probs[i][head * j..(head + 1) * j];
        // Mask by ranges (what the query sees: its window, then a prefix of the entries after
        // the window keys), then one softmax over the shared and own keys together.
        let prefix_end = n_window + view.prefix;
        row[..view.window.start].fill(f32::NEG_INFINITY);
        row[view.window.end..n_window].fill(f32::NEG_INFINITY);
        row[prefix_end..].fill(f32::NEG_INFINITY);
        let max =
            lanes_max(&row[view.window.clone()]).max(lanes_max(&row[n_window..prefix_end])).max(lanes_max(own_row));
        row.iter_mut().for_each(|v| *v -= max);
        own_row.iter_mut().for_each(|v| *v -= max);
        exp_in_place(row);
        exp_in_place(own_row);
        let total = lanes_sum(row) + lanes_sum(own_row) + (sink[head] - max).exp();
        let inv = 1.0 / total;
        row.iter_mut().for_each(|v| *v *= inv);
        own_row.iter_mut().for_each(|v| *v *= inv);
    }
    gemm_ab(rows, u, d, scores, shared, 0.0, out);
    for i in 0..b {
        let j = own[i].len() / d;
        if j > 0 {
            gemm_ab(h, j, d, &own_probs[i], &own[i], 1.0, &mut out[i * h * d..(i + 1) * h * d]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct softmax with sink, in f64, over an explicit key list per query.
    fn reference(q: &[f32], keys: &[Vec<&[f32]>], sink: &[f32], scale: f64, d: usize) -> Vec<f64> {
        let h = sink.len();
        let mut out = vec![0.0; keys.len() * h * d];
        for (b, ks) in keys.iter().enumerate() {
            for hh in 0..h {
                let qv = &q[(b * h + hh) * d..][..d];
                let s: Vec<f64> =
                    ks.iter().map(|k| scale * (0..d).map(|c| qv[c] as f64 * k[c] as f64).sum::<f64>()).collect();
                let denom: f64 = s.iter().map(|v| v.exp()).sum::<f64>() + (sink[hh] as f64).exp();
                for c in 0..d {
                    out[(b * h + hh) * d + c] = ks.iter().zip(&s).map(|(k, sv)| sv.exp() / denom * k[c] as f64).sum();
                }
            }
        }
        out
    }

    #[test]
    fn matches_direct_softmax_with_ranges_prefix_and_own_keys() {
        let (h, d) = (2, 4);
        let (n_window, n_prefix) = (5, 3);
        let shared: Vec<f32> = (0..(n_window + n_prefix) * d).map(|i| (i as f32 * 0.7).cos()).collect();
        let own: Vec<Vec<f32>> = vec![
            vec![],
            (0..2 * d).map(|i| (i as f32 * 0.3).sin()).collect(),
            (0..d).map(|i| i as f32 * 0.1).collect(),
        ];
        let views = vec![
            QueryKeys { window: 0..3, prefix: 0 },
            QueryKeys { window: 1..4, prefix: 2 },
            QueryKeys { window: 2..5, prefix: 3 },
        ];
        let q: Vec<f32> = (0..3 * h * d).map(|i| (i as f32 * 0.37).sin()).collect();
        let sink = [0.5f32, -1.0];
        let mut out = vec![0.0; 3 * h * d];
        let keys = BlockKeys { shared: shared.clone(), n_window, views: views.clone(), own: own.clone() };
        attend_block(&q, &keys, &sink, 0.5, d, &mut out);
        let key = |k: usize| &shared[k * d..(k + 1) * d];
        let lists: Vec<Vec<&[f32]>> = views
            .iter()
            .zip(&own)
            .map(|(v, o)| {
                v.window.clone().map(key).chain((n_window..n_window + v.prefix).map(key)).chain(o.chunks(d)).collect()
            })
            .collect();
        for (i, (got, want)) in out.iter().zip(reference(&q, &lists, &sink, 0.5, d)).enumerate() {
            assert!((*got as f64 - want).abs() < 1e-5, "element {i}: {got} vs {want}");
        }
    }

    /// The lane-wise reductions agree with plain ones at every length around the lane count
    /// (empty, tail only, whole chunks, chunks plus tail).
    #[test]
    fn lane_reductions_match_plain_ones() {
        for n in 0..20 {
            let v: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.25).collect();
            let max = v.iter().fold(f32::NEG_INFINITY, |m, x| m.max(*x));
            assert_eq!(lanes_max(&v), max, "max of {n}");
            // Quarter-steps sum exactly in any order.
            assert_eq!(lanes_sum(&v), v.iter().sum::<f32>(), "sum of {n}");
        }
    }

    /// A very negative sink is no sink: the weights sum to one.
    #[test]
    fn negligible_sink_gives_plain_softmax() {
        let q = vec![1.0f32; 2];
        let keys = vec![1.0f32, 1.0, 1.0, 1.0];
        let mut out = vec![0.0; 2];
        let keys = BlockKeys {
            shared: keys,
            n_window: 2,
            views: vec![QueryKeys { window: 0..2, prefix: 0 }],
            own: vec![vec![]],
        };
        attend_block(&q, &keys, &[-1e4], 1.0, 2, &mut out);
        assert!((out[0] - 1.0).abs() < 1e-6);
    }
}
