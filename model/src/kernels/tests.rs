//! Kernel results against a plain f64 computation over the scalar decode (itself checked against
//! the format tables in `numerics`).

use super::*;
use crate::numerics::f32_to_e8m0;

/// Deterministic pseudo-random bytes/floats for test matrices.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn f(&mut self) -> f32 {
        (self.next() % 20001) as f32 / 10000.0 - 1.0
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

fn random_matrix(format: WeightFormat, rows: usize, cols: usize, seed: u64) -> WeightMatrix {
    let mut r = Lcg(seed);
    match format {
        WeightFormat::F32 => WeightMatrix::from_f32(rows, cols, (0..rows * cols).map(|_| r.f()).collect()).unwrap(),
        WeightFormat::Bf16 => {
            let bytes: Vec<u8> =
                (0..rows * cols).flat_map(|_| half::bf16::from_f32(r.f()).to_bits().to_le_bytes()).collect();
            WeightMatrix::from_bf16(rows, cols, Bytes::from_vec(bytes)).unwrap()
        }
        WeightFormat::Fp8 => {
            // Any byte but the two NaN codes.
            let codes: Vec<u8> =
                (0..rows * cols).map(|_| r.byte()).map(|b| if b & 0x7f == 0x7f { 0x3f } else { b }).collect();
            let scales: Vec<f32> = (0..rows.div_ceil(128) * cols.div_ceil(128))
                .map(|i| crate::numerics::e8m0_to_f32(f32_to_e8m0(2f32.powi(i as i32 % 5 - 8))))
                .collect();
            WeightMatrix::from_fp8(rows, cols, Bytes::from_vec(codes), scales).unwrap()
        }
        WeightFormat::Fp4 => {
            let codes: Vec<u8> = (0..rows * cols / 2).map(|_| r.byte()).collect();
            let scales: Vec<u8> = (0..rows * cols / 32).map(|i| 120 + (i % 9) as u8).collect();
            WeightMatrix::from_fp4(rows, cols, Bytes::from_vec(codes), Bytes::from_vec(scales)).unwrap()
        }
    }
}

fn reference(x: &[f32], m: usize, w: &WeightMatrix) -> Vec<f64> {
    let mut row = vec![0.0; w.cols];
    let mut out = vec![0.0f64; m * w.rows];
    for n in 0..w.rows {
        w.decode_row_scalar(n, &mut row);
        for i in 0..m {
            out[i * w.rows + n] = row.iter().zip(&x[i * w.cols..]).map(|(a, b)| *a as f64 * *b as f64).sum();
        }
    }
    out
}

/// Tolerance: f32 accumulation of `k` products, relative to the sum of their magnitudes.
fn assert_close(got: &[f32], want: &[f64], x: &[f32], m: usize, w: &WeightMatrix, what: &str) {
    let wf = w.to_f32();
    for i in 0..m {
        for n in 0..w.rows {
            let mag: f64 = (0..w.cols).map(|k| (wf[n * w.cols + k] as f64 * x[i * w.cols + k] as f64).abs()).sum();
            let (g, r) = (got[i * w.rows + n] as f64, want[i * w.rows + n]);
            assert!((g - r).abs() <= 1e-5 * mag + 1e-30, "{what}: [{i},{n}] got {g} want {r} (mag {mag})");
        }
    }
}

/// `x · Wᵀ` (`[m, rows]`, as [`matmul`]) through the matrix-vector kernels of family `simd`, on
/// one thread.
fn gemv_on(simd: Simd, x: &[f32], m: usize, w: &WeightMatrix) -> Vec<f32> {
    let mut out_t = vec![0.0; m * w.rows];
    gemv::gemv_transposed_with(simd, x, m, w, 0..w.rows, &mut out_t);
    let mut out = vec![0.0; m * w.rows];
    scatter_transposed(&out_t, m, w.rows, 0, &mut out);
    out
}

const FORMATS: [WeightFormat; 4] = [WeightFormat::F32, WeightFormat::Bf16, WeightFormat::Fp8, WeightFormat::Fp4];

#[test]
fn matmul_matches_reference_for_every_format_and_batch() {
    for format in FORMATS {
        for &(rows, cols) in &[(37, 256), (130, 160), (5, 96), (7, 200), (9, 20)] {
            if format == WeightFormat::Fp4 && cols % 32 != 0 {
                continue;
            }
            let w = random_matrix(format, rows, cols, rows as u64 * 31 + cols as u64);
            for m in [1, 2, 3, 4, 8, 9, 40] {
                let mut r = Lcg(m as u64 + 99);
                let x: Vec<f32> = (0..m * cols).map(|_| r.f()).collect();
                let want = reference(&x, m, &w);
                let what = format!("{format:?} {rows}x{cols} m={m}");
                assert_close(&matmul(&x, m, &w), &want, &x, m, &w, &what);
                // Every kernel family this CPU runs, not only the best.
                for simd in simd_levels().into_iter().filter(|_| m <= gemv::MAX_ROWS) {
                    assert_close(&gemv_on(simd, &x, m, &w), &want, &x, m, &w, &format!("{what} {simd:?}"));
                }
            }
        }
    }
}

#[test]
fn matmul_rows_selects_a_row_range() {
    let w = random_matrix(WeightFormat::Fp8, 300, 256, 5);
    let x: Vec<f32> = (0..2 * 256).map(|i| (i as f32 * 0.01).sin()).collect();
    let full = matmul(&x, 2, &w);
    let part = matmul_rows(&x, 2, &w, 130..260);
    for i in 0..2 {
        for j in 0..130 {
            assert_eq!(part[i * 130 + j], full[i * 300 + 130 + j]);
        }
    }
}

#[test]
fn portable_and_simd_paths_agree() {
    for format in FORMATS {
        // A width with a tail after the 32-wide units (FP4 widths are always multiples of 32).
        let cols = if format == WeightFormat::Fp4 { 224 } else { 200 };
        let w = random_matrix(format, 24, cols, 17);
        let x: Vec<f32> = (0..3 * cols).map(|i| (i as f32 * 0.37).cos()).collect();
        let portable = gemv_on(Simd::Portable, &x, 3, &w);
        for simd in simd_levels() {
            for (a, b) in gemv_on(simd, &x, 3, &w).iter().zip(&portable) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{format:?} {simd:?}: {a} vs {b}");
            }
        }
    }
}

#[test]
fn simd_decode_is_exact() {
    for format in FORMATS {
        let w = random_matrix(format, 9, 288, 3);
        let mut fast = vec![0.0; 288];
        let mut slow = vec![0.0; 288];
        for r in 0..9 {
            decode_row(&w, r, &mut fast);
            w.decode_row_scalar(r, &mut slow);
            assert_eq!(fast, slow, "{format:?} row {r}");
        }
    }
}

/// Every code at every position of a 128-wide row, through the dot kernels with one and with
/// three activation rows. Each weight row holds one nonzero code, so every product is exact: a
/// value decoded wrong, or paired with another position's input or another block's scale (the
/// FP8 and FP4 dot decoders work out of order, FP8 with power-of-two factors on weights and
/// inputs, FP4 two scale blocks per step), shows up as an exact mismatch that a tolerance over
/// whole sums would hide. Inputs span 2^-32..2^32. (The bf16 dot decoder's order is caught by the
/// reference test above: its random values would be summed against the wrong inputs.)
#[test]
fn dot_products_pair_every_code_with_its_own_input() {
    const COLS: usize = 128;
    for format in [WeightFormat::Fp8, WeightFormat::Fp4] {
        // FP8: every byte but the two NaN codes; FP4: every nibble.
        let codes: Vec<u8> = match format {
            WeightFormat::Fp8 => (0..=255u8).filter(|c| c & 0x7f != 0x7f).collect(),
            _ => (0..16u8).collect(),
        };
        let rows = codes.len() * COLS;
        let code_at = |r: usize, k: usize| if k == r % COLS { codes[r / COLS] } else { 0 };
        let w = match format {
            WeightFormat::Fp8 => {
                let bytes = (0..rows * COLS).map(|i| code_at(i / COLS, i % COLS)).collect();
                WeightMatrix::from_fp8(rows, COLS, Bytes::from_vec(bytes), vec![1.0; rows.div_ceil(128)]).unwrap()
            }
            _ => {
                let bytes = (0..rows * COLS / 2)
                    .map(|i| code_at(2 * i / COLS, 2 * i % COLS) | code_at(2 * i / COLS, 2 * i % COLS + 1) << 4)
                    .collect();
                // A different scale for each block of a row (2^-2..2^1).
                let scales = (0..rows * COLS / FP4_BLOCK).map(|b| 125 + (b % 4) as u8).collect();
                WeightMatrix::from_fp4(rows, COLS, Bytes::from_vec(bytes), Bytes::from_vec(scales)).unwrap()
            }
        };
        for (m, simd) in [1, 3].into_iter().flat_map(|m| simd_levels().into_iter().map(move |s| (m, s))) {
            // Distinct inputs per position and row, exact in f32, and so is each product.
            let x: Vec<f32> =
                (0..m * COLS).map(|i| (1.0 + i as f32 / 64.0) * 2f32.powi((i % 65) as i32 - 32)).collect();
            let got = gemv_on(simd, &x, m, &w);
            let mut row = vec![0.0; COLS];
            for r in 0..rows {
                w.decode_row_scalar(r, &mut row);
                let k = r % COLS;
                for i in 0..m {
                    let want = row[k] * x[i * COLS + k];
                    let code = codes[r / COLS];
                    assert_eq!(got[i * rows + r], want, "{format:?} code {code:#x} at input {k}, m={m}, {simd:?}");
                }
            }
        }
    }
}

/// FP8 with a different scale per 128×128 tile, some above 1, which the dot kernels fold into
/// the activations one row tile at a time: each weight row holds one nonzero code, at an input
/// that walks all three input tiles, so a product taken with another tile's scale shows as an
/// exact mismatch. Also through a row-block view that starts inside a tile and ends in the next.
#[test]
fn fp8_dot_products_take_each_tiles_scale() {
    const ROWS: usize = 300;
    const COLS: usize = 352;
    let column = |row: usize| (row * 37) % COLS;
    let mut r = Lcg(11);
    let mut bytes = vec![0u8; ROWS * COLS];
    for row in 0..ROWS {
        let c = r.byte();
        bytes[row * COLS + column(row)] = if c & 0x7f == 0x7f { 0x3f } else { c };
    }
    // 2^-6 ..= 2^4 over the 3×3 tiles.
    let scales: Vec<f32> = (0..9).map(|i| 2f32.powi((i * 5) % 11 - 6)).collect();
    let w = WeightMatrix::from_fp8(ROWS, COLS, Bytes::from_vec(bytes), scales).unwrap();
    for m in [1, 3] {
        // At most 11 significant bits, so every product with an e4m3 value times a scale is exact.
        let x: Vec<f32> = (0..m * COLS).map(|i| (1.0 + i as f32 / 1024.0) * 2f32.powi((i % 23) as i32 - 11)).collect();
        for (view, simd) in
            [0..ROWS, 130..260].into_iter().flat_map(|v| simd_levels().into_iter().map(move |s| (v.clone(), s)))
        {
            let block = w.row_block(view.clone());
            let got = gemv_on(simd, &x, m, &block);
            let mut row = vec![0.0; COLS];
            for b in 0..block.rows() {
                block.decode_row_scalar(b, &mut row);
                let k = column(view.start + b);
                for i in 0..m {
                    let want = row[k] * x[i * COLS + k];
                    let row = view.start + b;
                    assert_eq!(got[i * block.rows() + b], want, "row {row} input {k} m={m} view {view:?} {simd:?}");
                }
            }
        }
    }
}

/// The FP8 dot kernels load each 32-code step from one byte early too. `from_fp8` keeps a byte
/// before codes that start their owner (copying them after a padding byte) and keeps views that
/// have one as they are; whatever that byte holds, the products are the same.
#[test]
fn fp8_codes_keep_a_byte_before_that_never_counts() {
    const ROWS: usize = 16;
    const COLS: usize = 128;
    let codes = |w: &WeightMatrix| match &w.data {
        weight::WeightData::Fp8 { codes, .. } => codes.clone(),
        _ => unreachable!(),
    };
    let mut r = Lcg(5);
    let own: Vec<u8> = (0..ROWS * COLS).map(|_| r.byte()).map(|b| if b & 0x7f == 0x7f { 0x3f } else { b }).collect();
    let scales = vec![1.0; COLS.div_ceil(128)];
    let x: Vec<f32> = (0..COLS).map(|_| r.f()).collect();

    let copied = WeightMatrix::from_fp8(ROWS, COLS, Bytes::from_vec(own.clone()), scales.clone()).unwrap();
    assert!(codes(&copied).has_byte_before());
    assert_eq!(codes(&copied).as_slice(), &own[..]);

    let mut views = vec![copied];
    for before in [0x00u8, 0xff, 0x7f] {
        let owner = std::sync::Arc::new([vec![before], own.clone()].concat());
        let view = Bytes::new(owner, 1..1 + own.len());
        let start = view.as_slice().as_ptr();
        let w = WeightMatrix::from_fp8(ROWS, COLS, view, scales.clone()).unwrap();
        assert_eq!(codes(&w).as_slice().as_ptr(), start, "a view with a byte before is not copied");
        views.push(w);
    }
    // Each kernel family sums in its own order; within one, the byte before changes nothing.
    for simd in simd_levels() {
        let products: Vec<Vec<f32>> = views.iter().map(|w| gemv_on(simd, &x, 1, w)).collect();
        assert!(products.iter().all(|p| *p == products[0]), "the byte before the codes changed a product ({simd:?})");
    }
}

#[test]
fn fp4_nibble_order_is_low_first() {
    // Byte 0x71: low nibble 1 (0.5) is input 0, high nibble 7 (6.0) is input 1.
    let mut codes = vec![0u8; 16];
    codes[0] = 0x71;
    let w = WeightMatrix::from_fp4(1, 32, Bytes::from_vec(codes), Bytes::from_vec(vec![127])).unwrap();
    let mut row = vec![0.0; 32];
    decode_row(&w, 0, &mut row);
    assert_eq!(&row[..3], &[0.5, 6.0, 0.0]);
}

#[test]
fn dot_matches_scalar() {
    let a: Vec<f32> = (0..1000).map(|i| (i as f32).sin()).collect();
    let b: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.5).cos()).collect();
    let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
    assert!((dot(&a, &b) as f64 - want).abs() < 1e-3);
}

#[test]
fn matmul_many_equals_separate_products() {
    let a = random_matrix(WeightFormat::Bf16, 300, 256, 1);
    let b = random_matrix(WeightFormat::Fp8, 40, 256, 2);
    let c = random_matrix(WeightFormat::F32, 7, 96, 3);
    for m in [1, 3, 20] {
        let x: Vec<f32> = (0..m * 256).map(|i| (i as f32 * 0.1).sin()).collect();
        let y: Vec<f32> = (0..m * 96).map(|i| (i as f32 * 0.2).cos()).collect();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let many = pool.install(|| {
            // Jobs of one input not next to each other: results must come back in job order.
            matmul_many(&[MatmulJob { x: &x, m, w: &a }, MatmulJob { x: &y, m, w: &c }, MatmulJob { x: &x, m, w: &b }])
        });
        // Stacked GEMMs (m = 20) sum in the same order as separate ones, row by row.
        for (got, want) in [(&many[0], matmul(&x, m, &a)), (&many[1], matmul(&y, m, &c)), (&many[2], matmul(&x, m, &b))]
        {
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{g} vs {w}");
            }
        }
    }
}

/// The tiled GEMM (≤ 256 tokens) and the panel SGEMM (more tokens) on two threads, through every
/// split: tokens across threads (many tokens), weight rows across threads (few tokens, many rows),
/// narrow outputs, edge tiles (rows not a multiple of 6, tokens not a multiple of 16), and inputs
/// wider than the L2 pass of the packed activations.
#[test]
fn gemm_paths_match_reference_on_two_threads() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    for &(format, rows, cols, m) in &[
        (WeightFormat::Bf16, 130, 256, 70),
        (WeightFormat::Fp8, 601, 256, 20),
        (WeightFormat::F32, 24, 1024, 250),
        (WeightFormat::Fp4, 37, 2080, 33),
        (WeightFormat::Bf16, 40, 256, 300),
        // An input width that is not a multiple of 8 (the token packing's 8 × 8 squares).
        (WeightFormat::F32, 50, 100, 21),
        // Narrow outputs (weights packed, tokens in place): one exact 16-wide block, and a ragged
        // one with a last group of fewer than 6 tokens.
        (WeightFormat::Fp4, 16, 256, 48),
        (WeightFormat::Bf16, 64, 256, 100),
        (WeightFormat::Fp8, 40, 256, 37),
    ] {
        let w = random_matrix(format, rows, cols, rows as u64 + m as u64);
        let mut r = Lcg(m as u64 * 7 + 1);
        let x: Vec<f32> = (0..m * cols).map(|_| r.f()).collect();
        let got = pool.install(|| matmul(&x, m, &w));
        assert_close(&got, &reference(&x, m, &w), &x, m, &w, &format!("{format:?} {rows}x{cols} m={m}"));
    }
}
