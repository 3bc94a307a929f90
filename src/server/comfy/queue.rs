//! [`PromptQueue`]: ComfyUI's prompt queue and history (`execution.PromptQueue`,
//! `docs/comfyui-protocol.md` §1–2): prompts wait ordered by `number` (lower
//! first; `front` queues ahead) and each finished prompt leaves a history entry
//! (at most [`MAX_HISTORY`], oldest dropped). Every change sends `status` to
//! every socket.
//!
//! Prompts run one at a time on the [`Lane::Main`] lane, as in ComfyUI, with one
//! difference (ours): while the main lane runs a prompt that trains, the
//! [`Lane::Side`] lane runs the first waiting prompt that does not, so a graph
//! that samples the live adapter previews a run while it trains (the engine
//! serves those samples between optimizer steps).
//!
//! The executor's threads take prompts with [`PromptQueue::take`] and hand back
//! their entries with [`PromptQueue::finish`]; HTTP handlers read and edit the
//! rest, and may wait for a prompt's entry ([`PromptQueue::wait_for`]).
//!
//! Must not: run anything; it only orders and remembers.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use serde_json::{json, Value};

use super::graph::{NodeId, PromptGraph};
use super::hub::Hub;

/// ComfyUI's `MAXIMUM_HISTORY_SIZE`.
pub(crate) const MAX_HISTORY: usize = 10_000;

/// A prompt as queued.
#[derive(Clone, Debug)]
pub(crate) struct QueuedPrompt {
    /// The queue position as the client sees it (`number` in answers).
    pub number: Value,
    pub prompt_id: String,
    /// The prompt as sent.
    pub prompt: Value,
    pub extra_data: Value,
    /// The output nodes to execute.
    pub outputs: Vec<NodeId>,
    pub graph: PromptGraph,
    /// Where its messages go (`extra_data.client_id`).
    pub client_id: Option<String>,
    /// Whether it has a training node (what the side lane does not take).
    pub trains: bool,
    /// Ordering: `number`, then arrival.
    order: (f64, u64),
}

/// Where a prompt runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lane {
    /// Every prompt, in order, one at a time.
    Main,
    /// Prompts without training, while the main lane trains.
    Side,
}

/// A prompt being run.
#[derive(Clone, Debug)]
struct Running {
    lane: Lane,
    prompt: QueuedPrompt,
    /// The node running now, for a socket that connects mid-prompt.
    node: Option<NodeId>,
}

impl QueuedPrompt {
    /// ComfyUI's five-element queue item `[number, prompt_id, prompt, extra_data, outputs]`.
    pub(crate) fn item(&self) -> Value {
        json!([
            self.number,
            self.prompt_id,
            self.prompt,
            self.extra_data,
            self.outputs
        ])
    }
}

/// How a prompt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Success,
    Error,
    Interrupted,
}

/// A finished prompt.
#[derive(Clone, Debug)]
pub(crate) struct Finished {
    pub prompt_id: String,
    /// ComfyUI's history entry: `{prompt, outputs, status, meta}`.
    pub entry: Value,
    pub outcome: Outcome,
    /// Every executed node's output values (what `/fluxlora/run` answers).
    pub values: BTreeMap<NodeId, Vec<Value>>,
    /// The message of an `execution_error`, and its node's type.
    pub error: Option<(String, String)>,
}

#[derive(Default)]
struct State {
    pending: Vec<QueuedPrompt>,
    running: Vec<Running>,
    history: VecDeque<Finished>,
    /// ComfyUI's `self.number`: the next number of a prompt that gives none.
    counter: i64,
    arrivals: u64,
    stopped: bool,
}

/// The order prompts run in: `number`, then arrival.
fn by_order(a: &QueuedPrompt, b: &QueuedPrompt) -> std::cmp::Ordering {
    a.order
        .0
        .total_cmp(&b.order.0)
        .then(a.order.1.cmp(&b.order.1))
}

/// The queue, its history and its notifications.
pub(crate) struct PromptQueue {
    state: Mutex<State>,
    /// Wakes the executor when a prompt arrives or the queue stops.
    arrived: Condvar,
    /// Wakes handlers waiting for an entry.
    finished: Condvar,
    hub: Hub,
}

impl PromptQueue {
    pub(crate) fn new(hub: Hub) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            arrived: Condvar::new(),
            finished: Condvar::new(),
            hub,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Prompts waiting or running (`exec_info.queue_remaining`).
    pub(crate) fn remaining(&self) -> usize {
        let s = self.lock();
        s.pending.len() + s.running.len()
    }

    /// The `status` message's data.
    pub(crate) fn status(&self) -> Value {
        json!({"status": {"exec_info": {"queue_remaining": self.remaining()}}})
    }

    fn announce(&self) {
        self.hub.broadcast("status", self.status());
    }

    /// The number a new prompt gets: `number` when given, else the counter
    /// (negated for `front`), as ComfyUI's `post_prompt` does.
    pub(crate) fn number_for(&self, number: Option<f64>, front: bool) -> (Value, f64) {
        if let Some(n) = number {
            return (json!(n), n);
        }
        let mut s = self.lock();
        let n = if front { -s.counter } else { s.counter };
        s.counter += 1;
        (json!(n), n as f64)
    }

    /// Queues a prompt numbered with [`Self::number_for`].
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn put(
        &self,
        number: (Value, f64),
        prompt_id: String,
        prompt: Value,
        extra_data: Value,
        outputs: Vec<NodeId>,
        graph: PromptGraph,
        client_id: Option<String>,
        trains: bool,
    ) {
        {
            let mut s = self.lock();
            s.arrivals += 1;
            let order = (number.1, s.arrivals);
            s.pending.push(QueuedPrompt {
                number: number.0,
                prompt_id,
                prompt,
                extra_data,
                outputs,
                graph,
                client_id,
                trains,
                order,
            });
        }
        self.arrived.notify_all();
        self.announce();
    }

    /// Whether a prompt with this id is queued, running or in the history.
    pub(crate) fn knows(&self, prompt_id: &str) -> bool {
        let s = self.lock();
        s.pending.iter().any(|p| p.prompt_id == prompt_id)
            || s.running.iter().any(|r| r.prompt.prompt_id == prompt_id)
            || s.history.iter().any(|h| h.prompt_id == prompt_id)
    }

    /// Blocks until `lane` may take a pending prompt (taking the lowest it may),
    /// or the queue stops.
    pub(crate) fn take(&self, lane: Lane) -> Option<QueuedPrompt> {
        let mut s = self.lock();
        loop {
            if s.stopped {
                return None;
            }
            let main = s.running.iter().find(|r| r.lane == Lane::Main);
            let free = match lane {
                Lane::Main => main.is_none(),
                Lane::Side => {
                    main.is_some_and(|m| m.prompt.trains)
                        && !s.running.iter().any(|r| r.lane == Lane::Side)
                }
            };
            let lowest = s
                .pending
                .iter()
                .enumerate()
                .filter(|(_, p)| lane == Lane::Main || !p.trains)
                .min_by(|(_, a), (_, b)| by_order(a, b))
                .map(|(i, _)| i);
            if let (true, Some(i)) = (free, lowest) {
                let prompt = s.pending.remove(i);
                s.running.push(Running {
                    lane,
                    prompt: prompt.clone(),
                    node: None,
                });
                drop(s);
                // The other lane may now take one (the side lane, once training runs).
                self.arrived.notify_all();
                self.announce();
                return Some(prompt);
            }
            s = self.arrived.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The running prompts' ids and clients, and the node running in each.
    pub(crate) fn running(&self) -> Vec<(String, Option<String>, Option<NodeId>)> {
        self.lock()
            .running
            .iter()
            .map(|r| {
                (
                    r.prompt.prompt_id.clone(),
                    r.prompt.client_id.clone(),
                    r.node.clone(),
                )
            })
            .collect()
    }

    /// Notes the node a running prompt executes now (`None` between nodes).
    pub(crate) fn set_running_node(&self, prompt_id: &str, node: Option<NodeId>) {
        if let Some(r) = self
            .lock()
            .running
            .iter_mut()
            .find(|r| r.prompt.prompt_id == prompt_id)
        {
            r.node = node;
        }
    }

    /// Ends a running prompt with its history entry.
    pub(crate) fn finish(&self, finished: Finished) {
        {
            let mut s = self.lock();
            s.running
                .retain(|r| r.prompt.prompt_id != finished.prompt_id);
            s.history.push_back(finished);
            while s.history.len() > MAX_HISTORY {
                s.history.pop_front();
            }
        }
        self.finished.notify_all();
        self.arrived.notify_all();
        self.announce();
    }

    /// Waits until the prompt has a history entry (or the queue stops, or the
    /// prompt is deleted from the queue before it ran).
    pub(crate) fn wait_for(&self, prompt_id: &str) -> Option<Finished> {
        let mut s = self.lock();
        loop {
            if let Some(f) = s.history.iter().find(|h| h.prompt_id == prompt_id) {
                return Some(f.clone());
            }
            let queued = s.pending.iter().any(|p| p.prompt_id == prompt_id)
                || s.running.iter().any(|r| r.prompt.prompt_id == prompt_id);
            if s.stopped || !queued {
                return None;
            }
            s = self.finished.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// `GET /queue`: `(running items, pending items)`.
    pub(crate) fn items(&self) -> (Vec<Value>, Vec<Value>) {
        let s = self.lock();
        (
            s.running.iter().map(|r| r.prompt.item()).collect(),
            s.pending.iter().map(QueuedPrompt::item).collect(),
        )
    }

    /// Removes pending prompts: all, or those with these ids.
    pub(crate) fn remove_pending(&self, ids: Option<&[String]>) {
        {
            let mut s = self.lock();
            match ids {
                None => s.pending.clear(),
                Some(ids) => s.pending.retain(|p| !ids.contains(&p.prompt_id)),
            }
        }
        self.finished.notify_all();
        self.announce();
    }

    /// `GET /history`: the last `max_items` entries, or `max_items` from `offset`.
    pub(crate) fn history(
        &self,
        max_items: Option<usize>,
        offset: Option<usize>,
    ) -> Vec<(String, Value)> {
        let s = self.lock();
        let len = s.history.len();
        let (start, count) = match (max_items, offset) {
            (Some(n), None) => (len.saturating_sub(n), n),
            (n, Some(o)) => (o.min(len), n.unwrap_or(len)),
            (None, None) => (0, len),
        };
        s.history
            .iter()
            .skip(start)
            .take(count)
            .map(|f| (f.prompt_id.clone(), f.entry.clone()))
            .collect()
    }

    /// One finished prompt.
    pub(crate) fn finished(&self, prompt_id: &str) -> Option<Finished> {
        self.lock()
            .history
            .iter()
            .find(|f| f.prompt_id == prompt_id)
            .cloned()
    }

    /// Removes history entries: all, or those with these ids.
    pub(crate) fn remove_history(&self, ids: Option<&[String]>) {
        let mut s = self.lock();
        match ids {
            None => s.history.clear(),
            Some(ids) => s.history.retain(|f| !ids.contains(&f.prompt_id)),
        }
    }

    /// Every pending prompt, in the order they would run (the jobs list).
    pub(crate) fn pending(&self) -> Vec<QueuedPrompt> {
        let mut pending = self.lock().pending.clone();
        pending.sort_by(by_order);
        pending
    }

    /// The running prompts.
    pub(crate) fn running_prompts(&self) -> Vec<QueuedPrompt> {
        self.lock()
            .running
            .iter()
            .map(|r| r.prompt.clone())
            .collect()
    }

    /// Every finished prompt, oldest first.
    pub(crate) fn all_finished(&self) -> Vec<Finished> {
        self.lock().history.iter().cloned().collect()
    }

    /// Stops [`Self::take`] and every waiter.
    pub(crate) fn stop(&self) {
        self.lock().stopped = true;
        self.arrived.notify_all();
        self.finished.notify_all();
    }
}
