//! `layers::topk::torch_topk` against libstdc++ itself. The fixture was produced by
//! `data/topk_libstdcxx.cpp` (compiled with g++ 12 / libstdc++), which calls
//! `std::nth_element` / `std::partial_sort` exactly as PyTorch's CPU `topk` does, on inputs full
//! of ties (and of -inf, as the reference's prefill masking produces).

use expertmesh_model::layers::topk::torch_topk;

#[test]
fn selections_match_libstdcxx_on_tie_heavy_inputs() {
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(include_str!("data/topk_libstdcxx.json")).expect("fixture parses");
    assert!(cases.len() > 100);
    for (i, case) in cases.iter().enumerate() {
        let k = case["k"].as_u64().unwrap() as usize;
        let values: Vec<f32> = case["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().map_or(f32::NEG_INFINITY, |x| x as f32))
            .collect();
        let want: Vec<usize> =
            case["selected"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(torch_topk(&values, k), want, "case {i}: n={} k={k}", values.len());
    }
}
