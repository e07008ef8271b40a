//! The engine thread's loop: take messages, admit, run one step over every running sequence,
//! sample, emit, retire. Between steps sequences join and leave (continuous batching).

use expertmesh_model::engine::{ExpertBackend, LogitRows, Model, Step};
use expertmesh_model::{ExpertError, ModelError};
use expertmesh_runtime::ServiceError;
use expertmesh_runtime::metrics::{self, EngineMetrics, FinishedReason, RequestRole, RoleRequestMetrics};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Instant;

use super::sequence::{Sequence, Submission};
use super::{EngineEvent, EngineOptions, EngineStats, FinishReason, Msg};

pub struct EngineLoop {
    model: Arc<Model>,
    experts: Arc<dyn ExpertBackend>,
    opts: EngineOptions,
    stats: Arc<EngineStats>,
    waiting: VecDeque<Submission>,
    running: Vec<Sequence>,
    kv_used: u64,
    requests: &'static RoleRequestMetrics,
    engine: &'static EngineMetrics,
}

/// The one mapping from the model's errors to the services' error.
pub fn service_error(e: ModelError) -> ServiceError {
    match e {
        ModelError::Expert(ExpertError::Unavailable { .. }) => ServiceError::Unavailable(e.to_string()),
        ModelError::Expert(ExpertError::NotHeld { .. }) => ServiceError::Unavailable(e.to_string()),
        ModelError::InvalidInput(m) => ServiceError::invalid("prompt_tokens", m),
        other => ServiceError::Internal(other.to_string()),
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_default()
}

impl EngineLoop {
    pub fn new(
        model: Arc<Model>,
        experts: Arc<dyn ExpertBackend>,
        opts: EngineOptions,
        stats: Arc<EngineStats>,
    ) -> Self {
        EngineLoop {
            model,
            experts,
            opts,
            stats,
            waiting: VecDeque::new(),
            running: Vec::new(),
            kv_used: 0,
            requests: metrics::role_metrics(RequestRole::Attention),
            engine: metrics::engine(),
        }
    }

    pub fn run(mut self, rx: mpsc::Receiver<Msg>) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                let keep_going = rx.recv().is_ok_and(|m| self.handle(m));
                if !keep_going {
                    return self.stop_all();
                }
            }
            while let Ok(m) = rx.try_recv() {
                if !self.handle(m) {
                    return self.stop_all();
                }
            }
            self.drop_departed();
            self.admit();
            self.publish();
            if !self.running.is_empty() {
                self.step();
            }
            self.publish();
        }
    }

    /// False on `Stop`.
    fn handle(&mut self, m: Msg) -> bool {
        match m {
            Msg::Submit(sub) => self.waiting.push_back(*sub),
            Msg::Cancel(id, found) => {
                let queued = self.waiting.iter().position(|s| s.params.id == id);
                let running = self.running.iter().position(|s| s.id() == id);
                let _ = found.send(queued.is_some() || running.is_some());
                if let Some(i) = queued {
                    let sub = self.waiting.remove(i).unwrap();
                    self.requests.finished(FinishedReason::Abort);
                    let _ = sub.events.send(EngineEvent::Finished {
                        reason: FinishReason::Cancelled,
                        prompt_tokens: sub.params.prompt.len(),
                        completion_tokens: 0,
                    });
                }
                if let Some(i) = running {
                    let seq = self.running.swap_remove(i);
                    seq.finish(FinishReason::Cancelled, self.requests);
                    self.kv_used -= seq.sub.state_bytes;
                }
            }
            Msg::Stop => return false,
        }
        true
    }

    fn stop_all(&mut self) {
        let gone = ServiceError::Unavailable("engine shutting down".into());
        for s in self.waiting.drain(..) {
            let _ = s.events.send(EngineEvent::Failed(gone.clone()));
            self.requests.failed(metrics::ErrorKind::Unavailable);
        }
        for s in self.running.drain(..) {
            s.fail(&gone, self.requests);
        }
        self.kv_used = 0;
        self.publish();
    }

    /// Callers that went away cancel their work.
    fn drop_departed(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|s| !s.events.is_closed());
        for _ in self.waiting.len()..before {
            self.requests.finished(FinishedReason::Abort);
        }
        let gone: Vec<bool> = self.running.iter().map(|s| s.sub.events.is_closed()).collect();
        let requests = self.requests;
        self.retire(&gone, |s| s.finish(FinishReason::Cancelled, requests));
    }

    /// Removes the running sequences marked in `mask` (indexed like `running`), releasing their
    /// state budget; `last_words` runs on each first.
    fn retire(&mut self, mask: &[bool], mut last_words: impl FnMut(&Sequence)) {
        let mut i = 0;
        let mut freed = 0;
        self.running.retain(|s| {
            let hit = mask[i];
            i += 1;
            if hit {
                last_words(s);
                freed += s.sub.state_bytes;
            }
            !hit
        });
        self.kv_used -= freed;
    }

    fn admit(&mut self) {
        while let Some(front) = self.waiting.front() {
            if self.running.len() >= self.opts.max_running
                || self.kv_used + front.state_bytes > self.opts.kv_budget_bytes
            {
                break;
            }
            let sub = self.waiting.pop_front().unwrap();
            let queued = sub.submitted.elapsed().as_secs_f64();
            self.requests.queue.observe(queued);
            tracing::info!(
                request_id = %sub.params.id,
                trace_id = %sub.trace_id(),
                prompt_tokens = sub.params.prompt.len(),
                max_tokens = sub.params.max_tokens,
                queue_seconds = queued,
                "request admitted"
            );
            let seq = Sequence::new(sub, self.model.new_sequence());
            if seq.send(EngineEvent::Admitted { queue_seconds: queued }) {
                self.kv_used += seq.sub.state_bytes;
                self.running.push(seq);
            }
        }
    }

    /// One forward pass over every running sequence (prefill chunks within the budget).
    fn step(&mut self) {
        let mut budget = self.opts.prefill_chunk;
        // (index into running, tokens of this step, completes the prompt)
        let mut plan: Vec<(usize, Vec<u32>, bool)> = Vec::with_capacity(self.running.len());
        for (i, s) in self.running.iter().enumerate() {
            let prompt = &s.sub.params.prompt;
            if s.prefilling() {
                let take = budget.min(prompt.len() - s.prefilled);
                if take > 0 {
                    budget -= take;
                    let done = s.prefilled + take == prompt.len();
                    plan.push((i, prompt[s.prefilled..s.prefilled + take].to_vec(), done));
                }
            } else {
                plan.push((i, vec![*s.generated.last().expect("decoding sequences have a token")], true));
            }
        }
        let mut in_step = vec![false; self.running.len()];
        plan.iter().for_each(|(i, _, _)| in_step[*i] = true);
        let traces: Vec<[u8; 16]> = plan
            .iter()
            .filter_map(|(i, _, _)| self.running[*i].sub.params.trace.filter(|t| t.sampled).map(|t| t.trace_id))
            .collect();
        self.experts.begin_step(&traces);
        self.engine.step_batch_size.observe(plan.len() as f64);
        self.engine.step_tokens.observe(plan.iter().map(|(_, t, _)| t.len()).sum::<usize>() as f64);
        let step_start = Instant::now();
        let result = {
            let mut steps: Vec<Step<'_>> = Vec::with_capacity(plan.len());
            let mut plan_iter = plan.iter().peekable();
            for (i, s) in self.running.iter_mut().enumerate() {
                if let Some((_, tokens, logits)) = plan_iter.next_if(|(j, _, _)| *j == i) {
                    let mut step = Step::new(&mut s.state, tokens);
                    step.logits = if *logits { LogitRows::Last } else { LogitRows::None };
                    steps.push(step);
                }
            }
            // A bug in one step must fail that step's requests, not the engine thread.
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.model.forward(&mut steps, &*self.experts)
            })) {
                Ok(r) => r.map_err(service_error),
                Err(p) => Err(ServiceError::Internal(format!("engine step panicked: {}", panic_message(&*p)))),
            }
        };
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        self.engine.step_seconds.observe(step_start.elapsed().as_secs_f64());
        let outputs = match result {
            Ok(o) => o,
            Err(err) => {
                // Every sequence in the step has an inconsistent state now: fail them all.
                tracing::warn!(error = %err, sequences = plan.len(), "engine step failed");
                let requests = self.requests;
                self.retire(&in_step, |s| s.fail(&err, requests));
                return;
            }
        };
        let max_context = self.model.config().max_position_embeddings;
        let mut done = vec![false; self.running.len()];
        for ((i, tokens, _), out) in plan.iter().zip(outputs) {
            let s = &mut self.running[*i];
            if s.prefilling() {
                s.prefilled += tokens.len();
                self.stats.prompt_tokens.fetch_add(tokens.len() as u64, Ordering::Relaxed);
                self.requests.prompt_tokens.inc_by(tokens.len() as u64);
            }
            if out.rows == 0 {
                continue;
            }
            let sampled = s.sampler.sample(&out.logits);
            s.generated.push(sampled.token);
            s.observe_token(self.requests);
            self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
            let event = EngineEvent::Token {
                token: sampled.token,
                index: s.generated.len() - 1,
                logprob: s.sub.params.logprobs.then_some(sampled.logprob),
            };
            if !s.send(event) {
                s.finish(FinishReason::Cancelled, self.requests);
                done[*i] = true;
                continue;
            }
            let reason = if s.sub.params.stop_tokens.contains(&sampled.token) {
                Some(FinishReason::Stop)
            } else if s.generated.len() >= s.sub.params.max_tokens || s.state.position() >= max_context {
                Some(FinishReason::Length)
            } else {
                None
            };
            if let Some(r) = reason {
                s.finish(r, self.requests);
                done[*i] = true;
            }
        }
        self.retire(&done, |_| {});
    }

    fn publish(&self) {
        self.stats.peak_running.fetch_max(self.running.len() as u64, Ordering::Relaxed);
        self.stats.peak_kv_bytes_used.fetch_max(self.kv_used, Ordering::Relaxed);
        self.stats.running.store(self.running.len() as u64, Ordering::Relaxed);
        self.stats.waiting.store(self.waiting.len() as u64, Ordering::Relaxed);
        self.stats.kv_bytes_used.store(self.kv_used, Ordering::Relaxed);
        self.requests.running.set(self.running.len() as i64);
        self.requests.waiting.set(self.waiting.len() as i64);
        self.engine.kv_cache_usage_perc.set(self.kv_used as f64 / self.opts.kv_budget_bytes.max(1) as f64);
    }
}
