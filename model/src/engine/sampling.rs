//! Choosing the next token from logits: greedy, or temperature with optional top-k and top-p
//! (nucleus) cuts, with a seeded generator so that the same seed reproduces the same tokens.

use crate::checkpoint::random::SplitMix64;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy (the first maximum).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0 = no cut).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1 = no cut).
    pub top_p: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0 }
    }
}

impl SamplingParams {
    /// Checks ranges; the error names the parameter.
    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!("temperature: {} is not a finite value ≥ 0", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p: {} is not in (0, 1]", self.top_p));
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// Natural log-probability of `token` under softmax(logits) (temperature 1, no cuts).
    pub logprob: f32,
}

pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
}

impl Sampler {
    pub fn new(params: SamplingParams, seed: u64) -> Self {
        Sampler { params, rng: SplitMix64::new(seed) }
    }

    pub fn sample(&mut self, logits: &[f32]) -> Sampled {
        let token = if self.params.is_greedy() { argmax(logits) } else { self.draw(logits) };
        Sampled { token: token as u32, logprob: log_softmax_at(logits, token) }
    }

    fn draw(&mut self, logits: &[f32]) -> usize {
        let p = &self.params;
        // Candidates by descending logit (ties: lower id first), cut to top-k.
        let mut order: Vec<usize> = (0..logits.len()).collect();
        let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
        if p.top_k > 0 && p.top_k < order.len() {
            order.select_nth_unstable_by(p.top_k - 1, by_logit);
            order.truncate(p.top_k);
        }
        order.sort_unstable_by(by_logit);
        let max = logits[order[0]];
        let mut probs: Vec<f64> = order.iter().map(|&i| (((logits[i] - max) / p.temperature) as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        if p.top_p < 1.0 {
            let mut cumulative = 0.0;
            let keep = probs
                .iter()
                .position(|q| {
                    cumulative += q;
                    cumulative >= p.top_p as f64
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        // Uniform in [0, Σ kept) with 53 bits of resolution.
        let u = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * probs.iter().sum::<f64>();
        let mut acc = 0.0;
        for (i, q) in probs.iter().enumerate() {
            acc += q;
            if u < acc {
                return order[i];
            }
        }
        order[probs.len() - 1]
    }
}

/// Index of the first maximum.
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

fn log_softmax_at(logits: &[f32], i: usize) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| ((x - max) as f64).exp()).sum();
    ((logits[i] - max) as f64 - sum.ln()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32) -> SamplingParams {
        SamplingParams { temperature, top_k, top_p }
    }

    #[test]
    fn greedy_takes_the_first_maximum_and_reports_its_logprob() {
        let mut s = Sampler::new(SamplingParams::default(), 1);
        let out = s.sample(&[0.0, 2.0, 2.0, 1.0]);
        assert_eq!(out.token, 1);
        // log(e^2 / (1 + 2e^2 + e)), computed independently.
        let expected = (2f64 - (1.0 + 2.0 * 2f64.exp() + 1f64.exp()).ln()) as f32;
        assert!((out.logprob - expected).abs() < 1e-6);
    }

    #[test]
    fn frequencies_follow_the_tempered_distribution() {
        let logits = [0.0f32, 1.0, 2.0];
        let mut s = Sampler::new(params(2.0, 0, 1.0), 42);
        let mut counts = [0usize; 3];
        let n = 60_000;
        for _ in 0..n {
            counts[s.sample(&logits).token as usize] += 1;
        }
        let z: f64 = logits.iter().map(|&l| (l as f64 / 2.0).exp()).sum();
        for (i, &c) in counts.iter().enumerate() {
            let p = (logits[i] as f64 / 2.0).exp() / z;
            // 5 standard deviations of a binomial proportion: fails by chance ~1e-6 of the time.
            let sd = (p * (1.0 - p) / n as f64).sqrt();
            assert!(((c as f64 / n as f64) - p).abs() < 5.0 * sd, "token {i}: {c}/{n} vs p={p:.4}");
        }
    }

    #[test]
    fn top_k_and_top_p_cut_the_tail() {
        let logits = [3.0f32, 2.9, 0.0, -1.0, 2.8];
        let mut k = Sampler::new(params(1.0, 2, 1.0), 3);
        let mut p = Sampler::new(params(1.0, 0, 0.5), 3);
        for _ in 0..2000 {
            assert!(matches!(k.sample(&logits).token, 0 | 1));
            // p(0) ≈ 0.36, p(0)+p(1) ≈ 0.69 ≥ 0.5: only tokens 0 and 1 survive.
            assert!(matches!(p.sample(&logits).token, 0 | 1));
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(0.8, 20, 0.9), seed);
            (0..32).map(|_| s.sample(&logits).token).collect::<Vec<_>>()
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
    }

    #[test]
    fn rejects_out_of_range_parameters_by_name() {
        assert!(params(-1.0, 0, 1.0).validate().unwrap_err().starts_with("temperature"));
        assert!(params(f32::NAN, 0, 1.0).validate().unwrap_err().starts_with("temperature"));
        assert!(params(1.0, 0, 0.0).validate().unwrap_err().starts_with("top_p"));
        assert!(params(1.0, 0, 1.5).validate().unwrap_err().starts_with("top_p"));
        assert!(params(0.7, 40, 0.95).validate().is_ok());
    }
}
