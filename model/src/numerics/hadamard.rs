//! Orthonormal Walsh–Hadamard transform (Sylvester ordering), used by the Lightning Indexer on
//! its queries and keys before the FP4 simulation (spec §2). `H[i][j] = (-1)^popcount(i & j)`,
//! scaled by `n^-1/2` so that the transform is orthogonal.

/// In-place fast transform of `x` (length a power of two), including the `n^-1/2` scale.
pub fn hadamard_in_place(x: &mut [f32]) {
    let n = x.len();
    debug_assert!(n.is_power_of_two(), "Hadamard size {n} is not a power of two");
    let mut h = 1;
    while h < n {
        for block in x.chunks_exact_mut(2 * h) {
            let (lo, hi) = block.split_at_mut(h);
            for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
                let (u, v) = (*a, *b);
                *a = u + v;
                *b = u - v;
            }
        }
        h *= 2;
    }
    let scale = (n as f32).powf(-0.5);
    x.iter_mut().for_each(|v| *v *= scale);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_dense_sylvester_matrix() {
        let n = 16;
        let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.7).sin()).collect();
        let mut fast = x.clone();
        hadamard_in_place(&mut fast);
        for (j, got) in fast.iter().enumerate() {
            let dense: f32 = (0..n)
                .map(|i| {
                    let sign = if (i & j).count_ones() % 2 == 0 { 1.0 } else { -1.0 };
                    x[i] * sign
                })
                .sum::<f32>()
                / (n as f32).sqrt();
            assert!((dense - got).abs() < 1e-5, "column {j}: {dense} vs {got}");
        }
    }

    /// Spec §11.4: the transform is applied to indexer queries and keys alike, so without the FP4
    /// rounding it leaves their dot products (the indexer scores) unchanged.
    #[test]
    fn preserves_dot_products() {
        let a: Vec<f32> = (0..128).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..128).map(|i| (i as f32 * 0.11).cos() - 0.2).collect();
        let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f32>();
        let (mut ha, mut hb) = (a.clone(), b.clone());
        hadamard_in_place(&mut ha);
        hadamard_in_place(&mut hb);
        assert!((dot(&ha, &hb) - dot(&a, &b)).abs() < 1e-4);
    }

    #[test]
    fn is_orthogonal_and_self_inverse() {
        let x: Vec<f32> = (0..128).map(|i| (i as f32 * 1.3).cos()).collect();
        let mut y = x.clone();
        hadamard_in_place(&mut y);
        let norm_x: f32 = x.iter().map(|v| v * v).sum();
        let norm_y: f32 = y.iter().map(|v| v * v).sum();
        assert!((norm_x - norm_y).abs() < 1e-3);
        hadamard_in_place(&mut y);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}
