//! Teacher-forced logits: prefill a prompt, then feed the rest of a known sequence one token at a
//! time. The debugging path every serving engine offers, and what the golden tests compare.

use super::experts::ExpertBackend;
use super::model::{Model, Step};
use crate::error::ModelError;

/// Prefills `tokens[..prefill]`, then decodes `tokens[prefill..]` one by one. Returns
/// `[1 + len - prefill, vocab]`: the prefill's last position, then each decode step.
pub fn teacher_forced_logits(
    model: &Model,
    experts: &dyn ExpertBackend,
    tokens: &[u32],
    prefill: usize,
) -> Result<Vec<f32>, ModelError> {
    if prefill == 0 || prefill > tokens.len() {
        return Err(ModelError::InvalidInput(format!(
            "prefill must be between 1 and the number of tokens ({}), got {prefill}",
            tokens.len()
        )));
    }
    let mut state = model.new_sequence();
    let mut logits = Vec::with_capacity((1 + tokens.len() - prefill) * model.config().vocab_size);
    let first = model.forward(&mut [Step::new(&mut state, &tokens[..prefill])], experts)?;
    logits.extend_from_slice(&first[0].logits);
    for t in prefill..tokens.len() {
        let out = model.forward(&mut [Step::new(&mut state, &tokens[t..t + 1])], experts)?;
        logits.extend_from_slice(&out[0].logits);
    }
    Ok(logits)
}
