//! The event bus: every event of every job, numbered, fanned out to subscribers.
//!
//! Each subscriber has a bounded queue. Publishing never blocks: when a queue is
//! full, a preview waiting in it is dropped to make room (previews are the bulky,
//! replaceable kind); with no preview to drop, the oldest event goes and the
//! subscriber is told how many it missed, so it can replay them from the store by
//! sequence number. A queue also holds at most [`PREVIEWS_HELD`] previews (a newer
//! one replaces the oldest), so a stalled client holds a few images, not thousands.
//!
//! Events must be published in sequence order (the engine numbers and publishes
//! under one lock); a subscription knows the newest sequence number published
//! before it began ([`Subscription::after`]) and receives every later one of its
//! jobs, unless it falls behind and is told so.
//!
//! Must not: block the publisher, or know what an event means beyond "is preview".

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::events::Event;

/// Previews one subscriber's queue holds at most.
pub(crate) const PREVIEWS_HELD: usize = 4;

/// A subscriber's view: its queue and what it asked for.
struct Queue {
    events: VecDeque<Event>,
    capacity: usize,
    /// Events dropped since the subscriber last looked (not counting previews).
    missed: u64,
    closed: bool,
    stats: SubscriberStats,
}

/// How one subscriber keeps up, since it subscribed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct SubscriberStats {
    /// Events waiting in its queue now.
    pub queued: usize,
    pub delivered: u64,
    pub dropped_previews: u64,
    pub dropped_events: u64,
}

struct Slot {
    queue: Mutex<Queue>,
    /// Wakes a thread waiting in [`Subscription::recv`].
    ready: Condvar,
    /// Wakes a task waiting in [`Subscription::next`].
    ready_async: tokio::sync::Notify,
    /// Only these jobs; all when `None`.
    jobs: Option<Vec<String>>,
    previews: bool,
}

/// Fans events out to subscribers; cheap to share.
#[derive(Default)]
pub(crate) struct EventBus {
    inner: Mutex<Subscribers>,
}

#[derive(Default)]
struct Subscribers {
    slots: Vec<Arc<Slot>>,
    /// The newest sequence number published.
    last_seq: u64,
}

/// The receiving end of one subscription. Dropping it unsubscribes.
pub struct Subscription {
    slot: Arc<Slot>,
    after: u64,
}

/// What a subscriber gets when it asks for the next event.
#[derive(Debug)]
pub enum Received {
    Event(Event),
    /// Events were dropped because the subscriber fell behind; replay from the store.
    Missed(u64),
    /// Nothing arrived within the wait.
    Timeout,
}

impl EventBus {
    /// A bus whose first event will be numbered after `last_seq`.
    pub(crate) fn new(last_seq: u64) -> Self {
        Self {
            inner: Mutex::new(Subscribers {
                slots: vec![],
                last_seq,
            }),
        }
    }

    /// The newest sequence number published.
    pub(crate) fn last_seq(&self) -> u64 {
        self.inner.lock().map(|i| i.last_seq).unwrap_or(0)
    }

    /// Subscribes to all jobs (`None`) or some, with room for `capacity` events,
    /// with or without previews.
    pub(crate) fn subscribe(
        &self,
        jobs: Option<Vec<String>>,
        capacity: usize,
        previews: bool,
    ) -> Subscription {
        let slot = Arc::new(Slot {
            queue: Mutex::new(Queue {
                events: VecDeque::new(),
                capacity: capacity.max(1),
                missed: 0,
                closed: false,
                stats: SubscriberStats::default(),
            }),
            ready: Condvar::new(),
            ready_async: tokio::sync::Notify::new(),
            jobs,
            previews,
        });
        let after = match self.inner.lock() {
            Ok(mut inner) => {
                inner.slots.push(slot.clone());
                inner.last_seq
            }
            Err(_) => 0,
        };
        Subscription { slot, after }
    }

    /// Delivers `event` to every interested subscriber without blocking.
    pub(crate) fn publish(&self, event: &Event) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        inner.last_seq = inner.last_seq.max(event.seq);
        // Subscriptions whose receiver is gone hold the only other reference.
        inner.slots.retain(|s| Arc::strong_count(s) > 1);
        for slot in inner.slots.iter() {
            if slot
                .jobs
                .as_ref()
                .is_some_and(|jobs| !jobs.contains(&event.job))
                || (event.is_preview() && !slot.previews)
            {
                continue;
            }
            let Ok(mut q) = slot.queue.lock() else {
                continue;
            };
            if event.is_preview()
                && q.events.iter().filter(|e| e.is_preview()).count() >= PREVIEWS_HELD
            {
                // A newer preview replaces the oldest one held.
                if let Some(i) = q.events.iter().position(Event::is_preview) {
                    q.events.remove(i);
                    q.stats.dropped_previews += 1;
                }
            }
            if q.events.len() >= q.capacity {
                if event.is_preview() {
                    q.stats.dropped_previews += 1;
                    continue;
                }
                match q.events.iter().position(Event::is_preview) {
                    Some(i) => {
                        q.events.remove(i);
                        q.stats.dropped_previews += 1;
                    }
                    None => {
                        q.events.pop_front();
                        q.missed += 1;
                        q.stats.dropped_events += 1;
                    }
                }
            }
            q.events.push_back(event.clone());
            slot.ready.notify_one();
            slot.ready_async.notify_one();
        }
    }
}

impl EventBus {
    /// Every live subscription's counters.
    pub(crate) fn stats(&self) -> Vec<SubscriberStats> {
        let Ok(inner) = self.inner.lock() else {
            return vec![];
        };
        inner
            .slots
            .iter()
            .filter(|s| Arc::strong_count(s) > 1)
            .filter_map(|s| {
                let q = s.queue.lock().ok()?;
                Some(SubscriberStats {
                    queued: q.events.len(),
                    ..q.stats
                })
            })
            .collect()
    }
}

impl Queue {
    /// What is waiting: missed events first, then the oldest event.
    fn take(&mut self) -> Option<Received> {
        if self.missed > 0 {
            let n = self.missed;
            self.missed = 0;
            return Some(Received::Missed(n));
        }
        let e = self.events.pop_front()?;
        self.stats.delivered += 1;
        Some(Received::Event(e))
    }
}

impl Subscription {
    /// The newest sequence number published before this subscription began: it
    /// receives the events after it.
    pub(crate) fn after(&self) -> u64 {
        self.after
    }

    /// The next event, waiting for it without blocking a thread (for async servers).
    pub(crate) async fn next(&self) -> Received {
        loop {
            match self.slot.queue.lock() {
                Ok(mut q) => {
                    if let Some(r) = q.take() {
                        return r;
                    }
                }
                Err(_) => return Received::Timeout,
            }
            // A publish between the check and here leaves a permit: no wake-up is lost.
            self.slot.ready_async.notified().await;
        }
    }

    /// The next event, waiting up to `timeout`.
    pub fn recv(&self, timeout: Duration) -> Received {
        let Ok(mut q) = self.slot.queue.lock() else {
            return Received::Timeout;
        };
        loop {
            if let Some(r) = q.take() {
                return r;
            }
            if q.closed {
                return Received::Timeout;
            }
            let (guard, result) = match self.slot.ready.wait_timeout(q, timeout) {
                Ok(r) => r,
                Err(_) => return Received::Timeout,
            };
            q = guard;
            if result.timed_out() && q.events.is_empty() && q.missed == 0 {
                return Received::Timeout;
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Ok(mut q) = self.slot.queue.lock() {
            q.closed = true;
            q.events.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::events::{EventKind, JobState};

    fn event(seq: u64, job: &str, kind: EventKind) -> Event {
        Event {
            seq,
            job: job.into(),
            time: 0.0,
            kind,
        }
    }

    fn progress(seq: u64) -> Event {
        event(
            seq,
            "a",
            EventKind::State {
                state: JobState::Running,
            },
        )
    }

    fn preview(seq: u64) -> Event {
        event(
            seq,
            "a",
            EventKind::Preview {
                step: seq,
                png: vec![1, 2, 3].into(),
            },
        )
    }

    #[test]
    fn full_queues_drop_previews_before_progress_and_count_misses() {
        let bus = EventBus::new(0);
        let sub = bus.subscribe(None, 2, true);
        bus.publish(&preview(1));
        bus.publish(&progress(2));
        bus.publish(&progress(3)); // full: the preview makes room
        bus.publish(&preview(4)); // full, no room for a preview: dropped
        bus.publish(&progress(5)); // full, no preview left: oldest dropped, counted
        let stats = bus.stats();
        assert_eq!(stats.len(), 1);
        assert_eq!(
            (
                stats[0].queued,
                stats[0].dropped_previews,
                stats[0].dropped_events
            ),
            (2, 2, 1)
        );
        let mut got = vec![];
        loop {
            match sub.recv(Duration::from_millis(10)) {
                Received::Event(e) => got.push(format!("e{}", e.seq)),
                Received::Missed(n) => got.push(format!("missed{n}")),
                Received::Timeout => break,
            }
        }
        assert_eq!(got, vec!["missed1", "e3", "e5"]);
    }

    #[test]
    fn a_queue_holds_a_few_previews_and_keeps_the_newest() {
        let bus = EventBus::new(0);
        let sub = bus.subscribe(None, 100, true);
        for seq in 1..=10 {
            bus.publish(&preview(seq));
        }
        bus.publish(&progress(11));
        assert_eq!(bus.stats()[0].dropped_previews, 10 - PREVIEWS_HELD as u64);
        let mut got = vec![];
        while let Received::Event(e) = sub.recv(Duration::from_millis(10)) {
            got.push(e.seq);
        }
        let newest: Vec<u64> = (11 - PREVIEWS_HELD as u64..=11).collect();
        assert_eq!(got, newest);
    }

    #[test]
    fn a_subscription_knows_the_newest_event_before_it() {
        let bus = EventBus::new(41);
        assert_eq!(bus.subscribe(None, 8, true).after(), 41);
        bus.publish(&progress(42));
        let sub = bus.subscribe(None, 8, true);
        assert_eq!((sub.after(), bus.last_seq()), (42, 42));
        bus.publish(&progress(43));
        assert!(matches!(sub.recv(Duration::from_millis(10)), Received::Event(e) if e.seq == 43));
    }

    #[tokio::test]
    async fn async_subscribers_wake_for_events_published_from_other_threads() {
        let bus = Arc::new(EventBus::new(0));
        let sub = bus.subscribe(None, 8, true);
        let publisher = bus.clone();
        let handle = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            publisher.publish(&progress(1));
            publisher.publish(&progress(2));
        });
        for want in [1, 2] {
            match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
                Ok(Received::Event(e)) => assert_eq!(e.seq, want),
                other => panic!("{other:?}"),
            }
        }
        handle.join().unwrap();
    }

    #[test]
    fn filters_by_job_and_previews_and_forgets_dropped_subscriptions() {
        let bus = EventBus::new(0);
        let only_b = bus.subscribe(Some(vec!["b".into()]), 8, false);
        bus.publish(&progress(1));
        let mut b_preview = preview(2);
        b_preview.job = "b".into();
        bus.publish(&b_preview);
        bus.publish(&event(
            2,
            "b",
            EventKind::State {
                state: JobState::Finished,
            },
        ));
        match only_b.recv(Duration::from_millis(10)) {
            Received::Event(e) => assert_eq!(e.seq, 2),
            other => panic!("{other:?}"),
        }
        drop(only_b);
        bus.publish(&progress(3));
        assert_eq!(bus.inner.lock().unwrap().slots.len(), 0);
    }
}
