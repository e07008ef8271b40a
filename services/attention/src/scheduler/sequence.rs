//! One request's life inside the engine: queued submission, then a running sequence with its
//! model state, sampler and progress.

use expertmesh_model::engine::{Sampler, SequenceState};
use std::time::Instant;

use super::{EngineEvent, EventSender, FinishReason, GenerateParams};

pub struct Submission {
    pub params: GenerateParams,
    /// State bytes reserved on admission (at full length).
    pub state_bytes: u64,
    pub events: EventSender,
    pub submitted: Instant,
}

pub struct Sequence {
    pub sub: Submission,
    pub state: SequenceState,
    pub sampler: Sampler,
    /// Prompt tokens already prefilled.
    pub prefilled: usize,
    pub generated: Vec<u32>,
}

impl Sequence {
    pub fn new(sub: Submission, state: SequenceState) -> Self {
        let sampler = Sampler::new(sub.params.sampling, sub.params.seed);
        Sequence { sub, state, sampler, prefilled: 0, generated: Vec::new() }
    }

    pub fn id(&self) -> &str {
        &self.sub.params.id
    }

    pub fn prefilling(&self) -> bool {
        self.prefilled < self.sub.params.prompt.len()
    }

    /// False once the caller has gone away.
    pub fn send(&self, e: EngineEvent) -> bool {
        self.sub.events.send(e).is_ok()
    }

    pub fn finish(&self, reason: FinishReason) {
        self.send(EngineEvent::Finished {
            reason,
            prompt_tokens: self.sub.params.prompt.len(),
            completion_tokens: self.generated.len(),
        });
    }
}
