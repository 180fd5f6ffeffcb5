//! [`RoundEngine`]: the coordinator's round state machine. Pure: no I/O, no clock reads, no tonic — inputs
//! (`join`, `poll`, `submit`, `tick`, each with the current time) return outcomes the caller acts on.
//!
//! A round samples clients (seeded), hands each a task, and closes when every sampled client answered, or
//! at its deadline when the quorum is met; a round that misses its quorum is re-sampled (up to
//! `max_retries`) or stops the run. Closing produces a [`ClosedRound`]; the caller persists it and then
//! calls [`RoundEngine::commit`] with the new global, so a crash never leaves a half round.
//!
//! **Invariant:** an update changes state only if it is for the open round and its task, from a sampled
//! client, not yet counted, before the deadline, and of the right names, shapes and finite values; anything
//! else is rejected with a [`Reject`] and changes nothing. Aggregation memory is O(adapter).
use std::collections::{BTreeMap, BTreeSet};

use fedsb_common::TensorSet;
use fedsb_common::aggregate::Aggregator;
use rand::SeedableRng;
use rand::seq::SliceRandom;

use crate::config::{ClientsPerRound, QuorumMiss};

/// The policy of a run's rounds.
#[derive(Clone, Debug)]
pub struct RoundPolicy {
    /// Rounds to complete.
    pub rounds: u64,
    /// Sample size.
    pub clients_per_round: ClientsPerRound,
    /// Joined clients needed before a round opens.
    pub min_clients: usize,
    /// Updates needed at the deadline (None: every sampled client).
    pub quorum: Option<usize>,
    /// How long a round stays open, in milliseconds.
    pub deadline_ms: u64,
    /// What a missed quorum leads to.
    pub on_quorum_miss: QuorumMiss,
    /// Re-samplings allowed per round.
    pub max_retries: u32,
    /// Seed of the sampling.
    pub seed: u64,
}

/// Why an update (or a request) was refused. Each maps to one gRPC status in the service.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    /// The run id is not this run's.
    #[error("unknown run `{0}`")]
    UnknownRun(String),
    /// The client never joined.
    #[error("unknown client `{0}`: join first")]
    UnknownClient(String),
    /// The update is for a round that is not open.
    #[error("stale update: round {got} is not open (current round {current})")]
    StaleRound {
        /// The update's round.
        got: u64,
        /// The round now.
        current: u64,
    },
    /// The client was not sampled in this round.
    #[error("client `{0}` is not sampled in this round")]
    NotSampled(String),
    /// The task id is not the one this client was given.
    #[error("task `{0}` is not this client's task for the round")]
    WrongTask(String),
    /// The client already submitted for this round.
    #[error("duplicate update: client `{0}` already submitted for this round")]
    Duplicate(String),
    /// The round's deadline passed.
    #[error("the round's deadline has passed")]
    DeadlinePassed,
    /// The update's tensors are wrong (names, shapes, values).
    #[error("invalid update: {0}")]
    Invalid(String),
    /// The run is over.
    #[error("the run is finished")]
    Finished,
}

/// What a polling client should do.
#[derive(Clone, Debug, PartialEq)]
pub enum Poll {
    /// Train on this task.
    Task(TaskInfo),
    /// Nothing now; ask again.
    Wait(String),
    /// The run is over.
    Finished(RunOutcome),
}

/// A task handed to a client.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskInfo {
    /// Round number, from 1.
    pub round: u64,
    /// The task's id.
    pub task_id: String,
    /// sha256 of the global blob to start from.
    pub global_sha256: String,
    /// The round's deadline (unix ms).
    pub deadline_ms: u64,
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq)]
pub struct RunOutcome {
    /// "completed" or "failed".
    pub status: String,
    /// Why.
    pub message: String,
    /// The final global blob.
    pub global_sha256: String,
}

/// Which task an update claims to answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpdateKey<'a> {
    /// The run.
    pub run_id: &'a str,
    /// The round.
    pub round: u64,
    /// The task.
    pub task_id: &'a str,
}

/// An accepted update's bookkeeping.
#[derive(Clone, Debug, PartialEq)]
pub struct UpdateMeta {
    /// Examples it was trained on.
    pub num_examples: u64,
    /// Local steps.
    pub steps: u32,
    /// Mean local training loss.
    pub train_loss: f64,
    /// DP-SGD: the client's privacy report (checked before the update reached the engine).
    pub dp: Option<fedsb_common::dp::DpReport>,
}

/// What a state change means for the caller.
#[derive(Debug)]
pub enum Event {
    /// A round opened.
    Opened {
        /// Round number.
        round: u64,
        /// Attempt (0 for the first sampling).
        attempt: u32,
        /// Sampled clients.
        sampled: Vec<String>,
    },
    /// A round closed with an aggregate: persist it, then call [`RoundEngine::commit`].
    Closed(Box<ClosedRound>),
    /// A round missed its quorum.
    Failed {
        /// Round number.
        round: u64,
        /// Attempt.
        attempt: u32,
        /// Sampled clients.
        sampled: Vec<String>,
        /// Clients that answered.
        contributed: Vec<String>,
        /// Opened at (unix ms).
        opened_ms: u64,
        /// Whether it will be retried (else the run stops).
        retry: bool,
    },
}

/// A closed round, to persist.
#[derive(Debug)]
pub struct ClosedRound {
    /// Round number.
    pub round: u64,
    /// Attempt.
    pub attempt: u32,
    /// The new global tensors.
    pub global: TensorSet,
    /// FedEx-LoRA, FLoRA: the product every client folds into its base weights.
    pub product: Option<TensorSet>,
    /// Sampled clients.
    pub sampled: Vec<String>,
    /// Clients whose update was aggregated, with their bookkeeping.
    pub contributed: Vec<(String, UpdateMeta)>,
    /// Sampled clients that sent nothing.
    pub lost: Vec<String>,
    /// Opened at (unix ms).
    pub opened_ms: u64,
    /// Closed at (unix ms).
    pub closed_ms: u64,
}

#[derive(Debug)]
struct OpenRound {
    round: u64,
    attempt: u32,
    opened_ms: u64,
    deadline_ms: u64,
    sampled: BTreeSet<String>,
    tasks: BTreeMap<String, String>,
    received: BTreeMap<String, UpdateMeta>,
    /// Sampled clients that left the run during the round (their task is given up).
    withdrawn: BTreeSet<String>,
}

#[derive(Debug)]
enum Phase {
    Waiting,
    Open(OpenRound),
    Closing { round: u64 },
    Finished(RunOutcome),
}

/// A joined client.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientState {
    /// Its local dataset size.
    pub num_examples: u64,
    /// Last request (unix ms).
    pub last_seen_ms: u64,
}

/// The coordinator's round state machine (see the module docs).
pub struct RoundEngine {
    run_id: String,
    policy: RoundPolicy,
    clients: BTreeMap<String, ClientState>,
    global: TensorSet,
    global_sha256: String,
    completed: u64,
    attempt: u32,
    phase: Phase,
    aggregator: Box<dyn Aggregator>,
    weighted: bool,
    left: BTreeMap<String, String>,
}

impl RoundEngine {
    /// An engine starting after `completed` rounds with `global` (sha256 `global_sha256`) as the global.
    pub fn new(
        run_id: impl Into<String>,
        policy: RoundPolicy,
        aggregator: Box<dyn Aggregator>,
        weighted: bool,
        global: TensorSet,
        global_sha256: String,
        completed: u64,
    ) -> Self {
        let phase = if completed >= policy.rounds {
            Phase::Finished(RunOutcome {
                status: "completed".into(),
                message: format!("all {} rounds completed", policy.rounds),
                global_sha256: global_sha256.clone(),
            })
        } else {
            Phase::Waiting
        };
        Self {
            run_id: run_id.into(),
            policy,
            clients: BTreeMap::new(),
            global,
            global_sha256,
            completed,
            attempt: 0,
            phase,
            aggregator,
            weighted,
            left: BTreeMap::new(),
        }
    }

    /// The run id.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// The current global tensors and their blob's sha256.
    pub fn global(&self) -> (&TensorSet, &str) {
        (&self.global, &self.global_sha256)
    }

    /// Rounds completed.
    pub fn completed_rounds(&self) -> u64 {
        self.completed
    }

    /// The joined clients.
    pub fn clients(&self) -> &BTreeMap<String, ClientState> {
        &self.clients
    }

    /// The run's outcome once finished.
    pub fn outcome(&self) -> Option<&RunOutcome> {
        match &self.phase {
            Phase::Finished(o) => Some(o),
            _ => None,
        }
    }

    /// Whether a closed round is being persisted (its aggregate not yet committed).
    pub fn is_closing(&self) -> bool {
        matches!(self.phase, Phase::Closing { .. })
    }

    /// A one-line description of the phase (status output).
    pub fn phase_summary(&self) -> String {
        match &self.phase {
            Phase::Waiting => {
                format!("waiting for {} clients (joined {})", self.policy.min_clients, self.clients.len())
            }
            Phase::Open(o) => format!(
                "round {} open (attempt {}): {}/{} updates, deadline in {} ms",
                o.round,
                o.attempt,
                o.received.len(),
                o.sampled.len(),
                o.deadline_ms
            ),
            Phase::Closing { round } => format!("round {round} closing"),
            Phase::Finished(o) => format!("finished: {} ({})", o.status, o.message),
        }
    }

    /// Registers (or refreshes) a client. A client that left the run may join again (a restarted client
    /// that finds its budget spent leaves again before training).
    pub fn join(&mut self, client: &str, num_examples: u64, now_ms: u64) {
        self.left.remove(client);
        self.clients.insert(client.to_string(), ClientState { num_examples, last_seen_ms: now_ms });
    }

    /// Clients that left the run, with their reasons.
    pub fn left(&self) -> &BTreeMap<String, String> {
        &self.left
    }

    /// `client` leaves the run for good (e.g. its privacy budget is spent): it is not sampled again, and a
    /// task it holds in the open round is given up, so the round closes as soon as the others have answered
    /// (or fails when they are fewer than its quorum). When fewer joined clients remain than a round needs, the
    /// run stops as failed, saying why.
    pub fn leave(&mut self, client: &str, reason: &str, now_ms: u64) -> Result<Option<Event>, Reject> {
        if !self.clients.contains_key(client) {
            return Err(Reject::UnknownClient(client.to_string()));
        }
        if matches!(self.phase, Phase::Finished(_)) {
            return Err(Reject::Finished);
        }
        self.clients.remove(client);
        self.left.insert(client.to_string(), reason.to_string());
        if let Phase::Open(o) = &mut self.phase
            && o.sampled.contains(client)
            && !o.received.contains_key(client)
        {
            o.withdrawn.insert(client.to_string());
            return self.settle(now_ms);
        }
        self.stop_if_too_few_left();
        Ok(None)
    }

    /// After a withdrawal: closes the round when every sampled client still in the run has answered (and they
    /// make its quorum), fails it when the rest cannot make the quorum any more.
    fn settle(&mut self, now_ms: u64) -> Result<Option<Event>, Reject> {
        let Phase::Open(o) = &self.phase else { return Ok(None) };
        let quorum = self.policy.quorum.unwrap_or(o.sampled.len()).min(o.sampled.len()).max(1);
        let possible = o.sampled.len() - o.withdrawn.len();
        let ev = if possible < quorum {
            Some(self.fail())
        } else if o.received.len() == possible {
            Some(self.close(now_ms)?)
        } else {
            None
        };
        self.stop_if_too_few_left();
        Ok(ev)
    }

    /// Between rounds, after clients left: stops the run when fewer remain than a round needs (new clients
    /// could still join a run that nobody left; one that lost clients for good is not left waiting forever).
    fn stop_if_too_few_left(&mut self) {
        if matches!(self.phase, Phase::Waiting) && self.too_few_left() {
            self.stop_short();
        }
    }

    /// Whether clients left and fewer remain than the quorum a round needs.
    fn too_few_left(&self) -> bool {
        !self.left.is_empty() && self.clients.len() < self.policy.quorum.unwrap_or(1).max(1)
    }

    /// Joined clients needed to open a round: `min_clients`, lowered by the clients that left for good (never
    /// below the quorum), so the run goes on with the others.
    fn min_to_open(&self) -> usize {
        let base = self.policy.min_clients.max(1);
        if self.left.is_empty() {
            base
        } else {
            base.saturating_sub(self.left.len()).max(self.policy.quorum.unwrap_or(1)).max(1)
        }
    }

    /// Ends a run that has fewer clients left than a round needs.
    fn stop_short(&mut self) {
        let reasons: Vec<String> = self.left.iter().map(|(c, r)| format!("{c}: {r}")).collect();
        self.phase = Phase::Finished(RunOutcome {
            status: "failed".into(),
            message: format!(
                "only {} client(s) remain after {} left the run, fewer than the quorum of {} a round needs ({})",
                self.clients.len(),
                self.left.len(),
                self.policy.quorum.unwrap_or(1).max(1),
                reasons.join("; ")
            ),
            global_sha256: self.global_sha256.clone(),
        });
    }

    fn touch(&mut self, client: &str, now_ms: u64) -> Result<(), Reject> {
        match self.clients.get_mut(client) {
            Some(c) => {
                c.last_seen_ms = now_ms;
                Ok(())
            }
            None => Err(Reject::UnknownClient(client.to_string())),
        }
    }

    /// What `client` should do now.
    pub fn poll(&mut self, client: &str, now_ms: u64) -> Result<Poll, Reject> {
        self.touch(client, now_ms)?;
        Ok(match &self.phase {
            Phase::Finished(o) => Poll::Finished(o.clone()),
            Phase::Waiting => {
                Poll::Wait(format!("waiting for clients to join ({}/{})", self.clients.len(), self.policy.min_clients))
            }
            Phase::Closing { round } => Poll::Wait(format!("round {round} is being aggregated")),
            Phase::Open(o) => {
                if !o.sampled.contains(client) {
                    Poll::Wait(format!("not sampled in round {}", o.round))
                } else if o.received.contains_key(client) {
                    Poll::Wait(format!("update for round {} received", o.round))
                } else if now_ms >= o.deadline_ms {
                    Poll::Wait(format!("round {} is past its deadline", o.round))
                } else {
                    Poll::Task(TaskInfo {
                        round: o.round,
                        task_id: o.tasks[client].clone(),
                        global_sha256: self.global_sha256.clone(),
                        deadline_ms: o.deadline_ms,
                    })
                }
            }
        })
    }

    /// Checks that `client` may submit for `key` now, without looking at tensors.
    pub fn check_submit(&self, client: &str, key: UpdateKey<'_>, now_ms: u64) -> Result<(), Reject> {
        let UpdateKey { run_id, round, task_id } = key;
        if run_id != self.run_id {
            return Err(Reject::UnknownRun(run_id.to_string()));
        }
        if !self.clients.contains_key(client) {
            return Err(Reject::UnknownClient(client.to_string()));
        }
        let o = match &self.phase {
            Phase::Open(o) => o,
            Phase::Finished(_) => return Err(Reject::Finished),
            Phase::Waiting | Phase::Closing { .. } => {
                return Err(Reject::StaleRound { got: round, current: self.completed + 1 });
            }
        };
        if round != o.round {
            return Err(Reject::StaleRound { got: round, current: o.round });
        }
        if !o.sampled.contains(client) {
            return Err(Reject::NotSampled(client.to_string()));
        }
        if o.received.contains_key(client) {
            return Err(Reject::Duplicate(client.to_string()));
        }
        if o.tasks.get(client).map(String::as_str) != Some(task_id) {
            return Err(Reject::WrongTask(task_id.to_string()));
        }
        if now_ms >= o.deadline_ms {
            return Err(Reject::DeadlinePassed);
        }
        Ok(())
    }

    /// Adds `client`'s update to the open round. On any error nothing changes. Returns an event when the
    /// update was the last one the round waited for.
    pub fn submit(
        &mut self,
        client: &str,
        key: UpdateKey<'_>,
        update: &TensorSet,
        meta: UpdateMeta,
        now_ms: u64,
    ) -> Result<Option<Event>, Reject> {
        self.check_submit(client, key, now_ms)?;
        let weight = if self.weighted { meta.num_examples as f64 } else { 1.0 };
        self.aggregator.add(update, weight).map_err(|e| Reject::Invalid(e.to_string()))?;
        self.touch(client, now_ms)?;
        let Phase::Open(o) = &mut self.phase else { unreachable!("checked above") };
        o.received.insert(client.to_string(), meta);
        if o.received.len() + o.withdrawn.len() == o.sampled.len() {
            let quorum = self.policy.quorum.unwrap_or(o.sampled.len()).min(o.sampled.len()).max(1);
            if o.received.len() >= quorum { Ok(Some(self.close(now_ms)?)) } else { Ok(Some(self.fail())) }
        } else {
            Ok(None)
        }
    }

    /// Advances time: opens a round when enough clients joined, and closes or fails the open round at its
    /// deadline.
    pub fn tick(&mut self, now_ms: u64) -> Result<Option<Event>, Reject> {
        match &self.phase {
            Phase::Waiting if self.clients.len() >= self.min_to_open() => Ok(Some(self.open(now_ms)?)),
            Phase::Open(o) if now_ms >= o.deadline_ms => {
                let quorum = self.policy.quorum.unwrap_or(o.sampled.len()).min(o.sampled.len()).max(1);
                if o.received.len() >= quorum { Ok(Some(self.close(now_ms)?)) } else { Ok(Some(self.fail())) }
            }
            _ => Ok(None),
        }
    }

    fn open(&mut self, now_ms: u64) -> Result<Event, Reject> {
        let round = self.completed + 1;
        let mut ids: Vec<String> = self.clients.keys().cloned().collect();
        let k = self.policy.clients_per_round.sample_size(ids.len());
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            self.policy.seed ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (self.attempt as u64) << 48,
        );
        ids.shuffle(&mut rng);
        ids.truncate(k);
        ids.sort();
        let sampled: BTreeSet<String> = ids.iter().cloned().collect();
        let tasks = ids.iter().map(|c| (c.clone(), format!("{}-r{round}a{}-{c}", self.run_id, self.attempt))).collect();
        self.aggregator.begin(&self.global).map_err(|e| Reject::Invalid(e.to_string()))?;
        self.phase = Phase::Open(OpenRound {
            round,
            attempt: self.attempt,
            opened_ms: now_ms,
            deadline_ms: now_ms + self.policy.deadline_ms,
            sampled,
            tasks,
            received: BTreeMap::new(),
            withdrawn: BTreeSet::new(),
        });
        Ok(Event::Opened { round, attempt: self.attempt, sampled: ids })
    }

    fn close(&mut self, now_ms: u64) -> Result<Event, Reject> {
        let Phase::Open(o) = std::mem::replace(&mut self.phase, Phase::Waiting) else {
            unreachable!("close is called on an open round")
        };
        let agg = match self.aggregator.finish() {
            Ok(g) => g,
            Err(e) => {
                self.phase = Phase::Open(o);
                return Err(Reject::Invalid(e.to_string()));
            }
        };
        let lost = o.sampled.iter().filter(|c| !o.received.contains_key(*c)).cloned().collect();
        self.phase = Phase::Closing { round: o.round };
        Ok(Event::Closed(Box::new(ClosedRound {
            round: o.round,
            attempt: o.attempt,
            global: agg.global,
            product: agg.product,
            sampled: o.sampled.into_iter().collect(),
            contributed: o.received.into_iter().collect(),
            lost,
            opened_ms: o.opened_ms,
            closed_ms: now_ms,
        })))
    }

    fn fail(&mut self) -> Event {
        let Phase::Open(o) = std::mem::replace(&mut self.phase, Phase::Waiting) else {
            unreachable!("fail is called on an open round")
        };
        let too_few = self.too_few_left();
        let retry =
            self.policy.on_quorum_miss == QuorumMiss::Retry && self.attempt < self.policy.max_retries && !too_few;
        if retry {
            self.attempt += 1;
        } else if too_few {
            self.stop_short();
        } else {
            self.phase = Phase::Finished(RunOutcome {
                status: "failed".into(),
                message: format!(
                    "round {} missed its quorum ({} of {} sampled clients answered){}",
                    o.round,
                    o.received.len(),
                    o.sampled.len(),
                    if self.policy.on_quorum_miss == QuorumMiss::Retry { " after all retries" } else { "" }
                ),
                global_sha256: self.global_sha256.clone(),
            });
        }
        Event::Failed {
            round: o.round,
            attempt: o.attempt,
            sampled: o.sampled.into_iter().collect(),
            contributed: o.received.into_keys().collect(),
            opened_ms: o.opened_ms,
            retry,
        }
    }

    /// Installs the persisted aggregate of round `round` as the new global; the run finishes after its last
    /// round.
    pub fn commit(&mut self, round: u64, global: TensorSet, global_sha256: String) {
        debug_assert!(matches!(self.phase, Phase::Closing { round: r } if r == round));
        self.global = global;
        self.global_sha256 = global_sha256;
        self.completed = round;
        self.attempt = 0;
        self.phase = if self.completed >= self.policy.rounds {
            Phase::Finished(RunOutcome {
                status: "completed".into(),
                message: format!("all {} rounds completed", self.policy.rounds),
                global_sha256: self.global_sha256.clone(),
            })
        } else {
            Phase::Waiting
        };
        self.stop_if_too_few_left();
    }

    /// Stops the run as failed (e.g. the round could not be persisted).
    pub fn abort(&mut self, message: String) {
        self.phase =
            Phase::Finished(RunOutcome { status: "failed".into(), message, global_sha256: self.global_sha256.clone() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use fedsb_common::aggregate::{Weighting, make_aggregator};

    fn global() -> TensorSet {
        let mut s = TensorSet::new();
        s.insert("l.lora_R.weight", Tensor::zeros((2, 2), candle_core::DType::F32, &Device::Cpu).unwrap());
        s
    }

    fn update(v: f32) -> TensorSet {
        let mut s = TensorSet::new();
        s.insert("l.lora_R.weight", Tensor::new(&[[v, v], [v, v]], &Device::Cpu).unwrap());
        s
    }

    fn k<'a>(run_id: &'a str, round: u64, task_id: &'a str) -> UpdateKey<'a> {
        UpdateKey { run_id, round, task_id }
    }

    fn meta() -> UpdateMeta {
        UpdateMeta { num_examples: 10, steps: 1, train_loss: 0.5, dp: None }
    }

    fn engine(rounds: u64, k: usize, quorum: Option<usize>, miss: QuorumMiss) -> RoundEngine {
        let policy = RoundPolicy {
            rounds,
            clients_per_round: ClientsPerRound::Count(k),
            min_clients: k,
            quorum,
            deadline_ms: 1000,
            on_quorum_miss: miss,
            max_retries: 1,
            seed: 1,
        };
        RoundEngine::new(
            "run",
            policy,
            make_aggregator(fedsb_common::Method::FedSb, Weighting::Uniform, &TensorSet::new()).unwrap(),
            false,
            global(),
            "g0".into(),
            0,
        )
    }

    fn task(e: &mut RoundEngine, c: &str, now: u64) -> TaskInfo {
        match e.poll(c, now).unwrap() {
            Poll::Task(t) => t,
            other => panic!("{c}: expected a task, got {other:?}"),
        }
    }

    #[test]
    fn a_round_closes_when_all_sampled_answered_and_averages() {
        let mut e = engine(1, 2, None, QuorumMiss::Stop);
        e.join("a", 10, 0);
        assert!(matches!(e.poll("a", 0).unwrap(), Poll::Wait(_)));
        e.join("b", 10, 0);
        assert!(matches!(e.tick(1).unwrap(), Some(Event::Opened { round: 1, .. })));
        let ta = task(&mut e, "a", 2);
        let tb = task(&mut e, "b", 2);
        assert!(e.submit("a", k("run", 1, &ta.task_id), &update(1.0), meta(), 3).unwrap().is_none());
        let Some(Event::Closed(c)) = e.submit("b", k("run", 1, &tb.task_id), &update(3.0), meta(), 4).unwrap() else {
            panic!("round should close")
        };
        let v = c.global.require("l.lora_R.weight").unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(v, vec![vec![2.0, 2.0], vec![2.0, 2.0]]);
        assert!(c.lost.is_empty());
        assert!(matches!(e.poll("a", 5).unwrap(), Poll::Wait(_)), "closing: wait");
        e.commit(1, c.global, "g1".into());
        let Poll::Finished(o) = e.poll("a", 6).unwrap() else { panic!() };
        assert_eq!((o.status.as_str(), o.global_sha256.as_str()), ("completed", "g1"));
    }

    #[test]
    fn a_client_that_leaves_gives_up_its_task_and_the_round_goes_on() {
        // 3 clients, all sampled, quorum 2: c leaves mid-round; a and b close the round without a deadline.
        let mut e = engine(3, 3, Some(2), QuorumMiss::Stop);
        for c in ["a", "b", "c"] {
            e.join(c, 10, 0);
        }
        e.tick(0).unwrap();
        let ta = task(&mut e, "a", 1);
        let tb = task(&mut e, "b", 1);
        assert!(e.submit("a", k("run", 1, &ta.task_id), &update(1.0), meta(), 2).unwrap().is_none());
        assert!(e.leave("c", "privacy budget spent", 3).unwrap().is_none(), "b has not answered yet");
        let Some(Event::Closed(c)) = e.submit("b", k("run", 1, &tb.task_id), &update(3.0), meta(), 4).unwrap() else {
            panic!("round should close once every remaining client answered")
        };
        assert_eq!(c.lost, vec!["c".to_string()]);
        assert_eq!(e.left().get("c").map(String::as_str), Some("privacy budget spent"));
        assert!(matches!(e.poll("c", 5), Err(Reject::UnknownClient(_))), "a client that left is unknown");
        e.commit(1, c.global, "g1".into());
        // Round 2 samples only a and b; b leaves: 1 of 2 left, below the quorum: the run fails, saying why.
        e.tick(10).unwrap();
        let _ = task(&mut e, "a", 11);
        assert!(matches!(e.poll("c", 11), Err(Reject::UnknownClient(_))));
        let ev = e.leave("b", "privacy budget spent", 12).unwrap();
        assert!(matches!(ev, Some(Event::Failed { round: 2, retry: false, .. })), "{ev:?}");
        let Poll::Finished(o) = e.poll("a", 13).unwrap() else { panic!() };
        assert_eq!(o.status, "failed");
        assert!(o.message.contains("quorum"), "{}", o.message);
        assert!(e.leave("a", "x", 14).is_err(), "the run is over");
        assert!(e.leave("zz", "x", 14).is_err(), "unknown client");
    }

    #[test]
    fn the_run_goes_on_with_fewer_clients_until_none_can_make_the_quorum() {
        let mut e = engine(3, 2, Some(1), QuorumMiss::Retry);
        e.join("a", 10, 0);
        e.join("b", 10, 0);
        e.tick(0).unwrap();
        let ta = task(&mut e, "a", 1);
        assert!(e.leave("b", "budget", 2).unwrap().is_none(), "a may still answer");
        let Some(Event::Closed(c)) = e.submit("a", k("run", 1, &ta.task_id), &update(1.0), meta(), 3).unwrap() else {
            panic!("a's update closes the round (quorum 1)")
        };
        e.commit(1, c.global, "g1".into());
        // min_clients 2, but b left for good: round 2 opens with a alone.
        assert!(matches!(e.tick(4).unwrap(), Some(Event::Opened { round: 2, .. })));
        let _ = task(&mut e, "a", 5);
        let ev = e.leave("a", "budget too", 6).unwrap();
        assert!(matches!(ev, Some(Event::Failed { retry: false, .. })), "{ev:?}");
        let o = e.outcome().expect("no client is left to make the quorum");
        assert_eq!(o.status, "failed");
        assert!(o.message.contains("b: budget") && o.message.contains("a: budget too"), "{}", o.message);
    }

    #[test]
    fn bad_submissions_are_rejected_and_change_nothing() {
        let mut e = engine(2, 2, None, QuorumMiss::Stop);
        e.join("a", 10, 0);
        e.join("b", 10, 0);
        e.tick(0).unwrap();
        let ta = task(&mut e, "a", 1);
        assert_eq!(
            e.submit("x", k("run", 1, &ta.task_id), &update(1.0), meta(), 2).unwrap_err(),
            Reject::UnknownClient("x".into())
        );
        assert!(matches!(
            e.submit("a", k("other", 1, &ta.task_id), &update(1.0), meta(), 2),
            Err(Reject::UnknownRun(_))
        ));
        assert!(matches!(
            e.submit("a", k("run", 2, &ta.task_id), &update(1.0), meta(), 2),
            Err(Reject::StaleRound { .. })
        ));
        assert!(matches!(e.submit("a", k("run", 1, "forged"), &update(1.0), meta(), 2), Err(Reject::WrongTask(_))));
        let mut nan = update(1.0);
        nan.insert("l.lora_R.weight", Tensor::new(&[[f32::NAN, 0.], [0., 0.]], &Device::Cpu).unwrap());
        assert!(matches!(e.submit("a", k("run", 1, &ta.task_id), &nan, meta(), 2), Err(Reject::Invalid(_))));
        let mut shape = TensorSet::new();
        shape.insert("l.lora_R.weight", Tensor::zeros((3, 3), candle_core::DType::F32, &Device::Cpu).unwrap());
        assert!(matches!(e.submit("a", k("run", 1, &ta.task_id), &shape, meta(), 2), Err(Reject::Invalid(_))));
        // A valid one, then a duplicate.
        assert!(e.submit("a", k("run", 1, &ta.task_id), &update(1.0), meta(), 3).unwrap().is_none());
        assert!(matches!(e.submit("a", k("run", 1, &ta.task_id), &update(9.0), meta(), 4), Err(Reject::Duplicate(_))));
        let tb = task(&mut e, "b", 5);
        assert!(matches!(
            e.submit("b", k("run", 1, &tb.task_id), &update(3.0), meta(), 1000),
            Err(Reject::DeadlinePassed)
        ));
        // Only a's update counted: at the deadline (quorum = all) the round fails.
        let Some(Event::Failed { retry, contributed, .. }) = e.tick(1000).unwrap() else { panic!() };
        assert!(!retry);
        assert_eq!(contributed, vec!["a".to_string()]);
        assert!(matches!(e.poll("a", 1001).unwrap(), Poll::Finished(o) if o.status == "failed"));
        assert!(matches!(e.check_submit("a", k("run", 1, &ta.task_id), 1002), Err(Reject::Finished)));
    }

    #[test]
    fn quorum_closes_at_the_deadline_and_misses_are_retried() {
        let mut e = engine(1, 3, Some(2), QuorumMiss::Retry);
        for c in ["a", "b", "c"] {
            e.join(c, 10, 0);
        }
        e.tick(0).unwrap();
        let ta = task(&mut e, "a", 1);
        e.submit("a", k("run", 1, &ta.task_id), &update(1.0), meta(), 2).unwrap();
        // Deadline with 1 of 3 (quorum 2): retry with a new sample.
        let Some(Event::Failed { retry: true, .. }) = e.tick(1000).unwrap() else { panic!() };
        assert!(matches!(e.tick(1001).unwrap(), Some(Event::Opened { round: 1, attempt: 1, .. })));
        let ta = task(&mut e, "a", 1002);
        let tb = task(&mut e, "b", 1002);
        assert!(ta.task_id.contains("a1"), "a new task id per attempt: {}", ta.task_id);
        e.submit("a", k("run", 1, &ta.task_id), &update(1.0), meta(), 1003).unwrap();
        e.submit("b", k("run", 1, &tb.task_id), &update(5.0), meta(), 1004).unwrap();
        let Some(Event::Closed(c)) = e.tick(2001).unwrap() else { panic!("quorum met at the deadline") };
        assert_eq!(c.lost, vec!["c".to_string()]);
        assert_eq!(c.global.require("l.lora_R.weight").unwrap().to_vec2::<f32>().unwrap()[0][0], 3.0);
    }

    #[test]
    fn sampling_is_seeded_and_a_fraction_works() {
        let mk = || {
            let policy = RoundPolicy {
                rounds: 1,
                clients_per_round: ClientsPerRound::Fraction(0.5),
                min_clients: 6,
                quorum: None,
                deadline_ms: 10,
                on_quorum_miss: QuorumMiss::Stop,
                max_retries: 0,
                seed: 9,
            };
            let mut e = RoundEngine::new(
                "run",
                policy,
                make_aggregator(fedsb_common::Method::FedSb, Weighting::Uniform, &TensorSet::new()).unwrap(),
                false,
                global(),
                "g".into(),
                0,
            );
            for i in 0..6 {
                e.join(&format!("c{i}"), 1, 0);
            }
            match e.tick(0).unwrap() {
                Some(Event::Opened { sampled, .. }) => sampled,
                _ => panic!(),
            }
        };
        let s = mk();
        assert_eq!(s.len(), 3);
        assert_eq!(s, mk());
    }
}
