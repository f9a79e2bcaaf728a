//! Coalescing: concurrent clients' calls to the same shard travel to it together, writes to its
//! primary ([`Writes`]) and reads to one of its ready copies ([`Reads`]).
//!
//! Each shard has a lane per kind: a queue of waiting items and at most `MAX_SENDERS` requests in
//! flight. An item joins the queue; if the lane has fewer senders than that, it starts one. A
//! sender takes everything queued (up to `MAX_WEIGHT`) as one request, hands each client its own
//! outcome, and repeats until the queue is empty. So a lone call goes out at once, and under load
//! the items that piled up during one round trip share the next, which is where the CPU went: one
//! HTTP exchange, one wake-up of the shard's writer and one Postgres statement per client call.
//! Each item keeps its own outcome (a write batch stays all-or-nothing on its own; a read range
//! gets its own rows), so coalescing changes no answer.
//!
//! A write sender that just carried several clients' items may hold its next request back
//! briefly ([`Kind::LINGER`]) until as many are queued again: the clients it answered need a
//! moment to send their next writes, and a request that leaves without them costs a group on
//! every copy. A lane that carried one item at a time (a lone client) never waits.
//!
//! Senders are spawned tasks, not the clients' own futures: a client that disconnects must not
//! strand the items of the others travelling with it. Does I/O (through [`upstream`]).

use crate::state::Routing;
use crate::upstream::{self, Batch, Upstream, UpstreamError};
use serde_json::value::RawValue;
use shard_server::api::{KeyRange, Op, WriteResponse};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, oneshot};

/// What travels in one kind of lane and how a request of it is sent.
pub trait Kind: Send + Sync + 'static {
    type Item: Send + 'static;
    type Out: Send + 'static;
    /// Requests in flight per shard.
    const MAX_SENDERS: usize;
    /// Most weight (see [`Kind::weight`]) in one request; a single heavier item still goes, alone.
    const MAX_WEIGHT: usize;
    fn weight(item: &Self::Item) -> usize;
    /// How long a sender may hold a request back for the queue to grow as big as its previous
    /// one; zero sends at once.
    const LINGER: Duration;
    /// Sends `items` to shard `shard_id` as one request (retrying as the upstream policy says);
    /// one outcome per item, in order.
    fn send(
        up: &Upstream,
        routing: Arc<Routing>,
        shard_id: &str,
        items: Vec<Self::Item>,
    ) -> impl Future<Output = Vec<Result<Self::Out, UpstreamError>>> + Send;
}

/// Client write batches to a shard's primary, through `write_batches`.
pub struct Writes;

impl Kind for Writes {
    type Item = Batch;
    type Out = WriteResponse;
    /// One: the primary's writer commits one group at a time anyway, so a second request in
    /// flight only split the clients that would have shared one group into two. Measured on A-1:
    /// 13 instead of 8.5 client writes per request and group, 30% less CPU per write, 3,900
    /// instead of 3,000 writes/s. A lone write still goes out at once.
    const MAX_SENDERS: usize = 1;
    /// Operations.
    const MAX_WEIGHT: usize = 2048;
    /// Each group costs a Postgres commit and an HTTP exchange on every copy whatever its size,
    /// and with one request in flight the clients just answered would otherwise mostly miss the
    /// next one. Measured on A-1 (concurrency 100): 0.32 instead of 0.36 CPU-ms per write and
    /// 5,130-5,410 instead of 4,580-4,900 writes/s; 3 ms did no better than 1. Tokio's timer
    /// rounds up to whole milliseconds, so the wait is 1-2 ms at most, and only under load.
    const LINGER: Duration = Duration::from_millis(1);
    fn weight(item: &Batch) -> usize {
        item.ops.len()
    }
    async fn send(
        up: &Upstream,
        routing: Arc<Routing>,
        shard_id: &str,
        items: Vec<Batch>,
    ) -> Vec<Result<WriteResponse, UpstreamError>> {
        upstream::write_batches(up, routing, shard_id, items, false).await
    }
}

/// Client key ranges (already clipped to the shard) to one ready copy of it, through
/// `read_ranges`; each carries its request id, and the first one's picks the copy.
pub struct Reads;

impl Kind for Reads {
    type Item = (KeyRange, u64);
    type Out = Box<RawValue>;
    /// One, like writes: more only make requests smaller, and each costs CPU on both sides
    /// 6,500 reads/s with two, 8,300 with one).
    const MAX_SENDERS: usize = 1;
    /// Ranges: bounds the answer a sender holds when clients read wide ranges.
    const MAX_WEIGHT: usize = 512;
    /// None: a read costs little upstream, and the row cache answers it without Postgres.
    const LINGER: Duration = Duration::ZERO;
    fn weight(_: &(KeyRange, u64)) -> usize {
        1
    }
    async fn send(
        up: &Upstream,
        routing: Arc<Routing>,
        shard_id: &str,
        items: Vec<(KeyRange, u64)>,
    ) -> Vec<Result<Box<RawValue>, UpstreamError>> {
        let request = items.first().map_or(0, |i| i.1);
        let ranges: Vec<KeyRange> = items.iter().map(|i| i.0).collect();
        match upstream::read_ranges(up, routing, shard_id, &ranges, request).await {
            Ok(parts) => parts.into_iter().map(Ok).collect(),
            Err(e) => items.iter().map(|_| Err(e.clone())).collect(),
        }
    }
}

/// Calls to shard servers through per-shard lanes: what the request path uses.
pub struct Coalescer {
    upstream: Upstream,
    writes: Lanes<Writes>,
    reads: Lanes<Reads>,
}

impl Coalescer {
    pub fn new(upstream: Upstream) -> Coalescer {
        Coalescer { upstream, writes: Lanes::default(), reads: Lanes::default() }
    }

    /// Sends one shard's part of a request to the shard's primary, carrying the routing table's
    /// epoch. Real writes join the shard's write lane, travelling with other clients' concurrent
    /// writes to the same shard; dry runs go alone.
    pub async fn write(
        &self,
        routing: Arc<Routing>,
        shard_id: &str,
        keys: &[i64],
        ops: Vec<Op>,
        dry_run: bool,
    ) -> Result<WriteResponse, UpstreamError> {
        let batch = Batch { keys: keys.to_vec(), ops };
        if dry_run {
            let mut results = upstream::write_batches(&self.upstream, routing, shard_id, vec![batch], true).await;
            return results.pop().expect("one result per batch");
        }
        self.writes.submit(&self.upstream, shard_id, batch).await
    }

    /// Reads `range` (already clipped to the shard) from one ready copy of `shard_id`, travelling
    /// with other clients' concurrent reads of the shard; `request` picks the copy.
    pub async fn read(&self, shard_id: &str, range: KeyRange, request: u64) -> Result<Box<RawValue>, UpstreamError> {
        self.reads.submit(&self.upstream, shard_id, (range, request)).await
    }
}

type Reply<K> = oneshot::Sender<Result<<K as Kind>::Out, UpstreamError>>;

/// Items taken off a lane's queue for one request, each with its client's reply.
type Taken<K> = Vec<(<K as Kind>::Item, Reply<K>)>;

/// The lanes of one kind, per shard.
pub struct Lanes<K: Kind> {
    lanes: Mutex<HashMap<String, Arc<Lane<K>>>>,
}

impl<K: Kind> Default for Lanes<K> {
    fn default() -> Self {
        Lanes { lanes: Mutex::default() }
    }
}

struct Lane<K: Kind> {
    state: Mutex<LaneState<K>>,
    /// Signalled when an item joins the queue (see [`Kind::LINGER`]).
    arrived: Notify,
}

struct LaneState<K: Kind> {
    queue: Vec<(K::Item, Reply<K>)>,
    /// Total weight of `queue`.
    weight: usize,
    senders: usize,
}

impl<K: Kind> Lanes<K> {
    /// Sends `item` to `shard_id` through its lane and waits for its own outcome.
    async fn submit(&self, up: &Upstream, shard_id: &str, item: K::Item) -> Result<K::Out, UpstreamError> {
        let lane = Arc::clone(self.lanes.lock().expect("lock").entry(shard_id.to_owned()).or_insert_with(|| {
            Arc::new(Lane {
                state: Mutex::new(LaneState { queue: Vec::new(), weight: 0, senders: 0 }),
                arrived: Notify::new(),
            })
        }));
        let (reply, outcome) = oneshot::channel();
        let start = {
            let mut s = lane.state.lock().expect("lock");
            s.weight += K::weight(&item);
            s.queue.push((item, reply));
            let start = s.senders < K::MAX_SENDERS;
            s.senders += usize::from(start);
            start
        };
        if start {
            tokio::spawn(send(up.clone(), lane, shard_id.to_owned()));
        } else {
            lane.arrived.notify_one();
        }
        outcome.await.unwrap_or_else(|_| Err(UpstreamError::Internal(format!("shard {shard_id}: lane failed"))))
    }
}

/// Takes the next request's worth of items off the queue, with their weight, or `None` (and
/// leaves) when it is empty. Deciding under the lock that the queue is empty and leaving is one
/// step, so an item queued just after always finds a sender or starts one.
fn next<K: Kind>(lane: &Lane<K>) -> Option<(Taken<K>, usize)> {
    let mut s = lane.state.lock().expect("lock");
    if s.queue.is_empty() {
        s.senders -= 1;
        return None;
    }
    let mut weight = 0;
    let take = s
        .queue
        .iter()
        .take_while(|(item, _)| {
            weight += K::weight(item);
            weight <= K::MAX_WEIGHT
        })
        .count()
        .max(1);
    let taken: Taken<K> = s.queue.drain(..take).collect();
    let taken_weight = taken.iter().map(|(item, _)| K::weight(item)).sum();
    s.weight -= taken_weight;
    Some((taken, taken_weight))
}

/// Waits until the queue weighs at least `target`, or `patience` passed.
async fn linger<K: Kind>(lane: &Lane<K>, target: usize, patience: Duration) {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        if lane.state.lock().expect("lock").weight >= target {
            return;
        }
        if tokio::time::timeout_at(deadline, lane.arrived.notified()).await.is_err() {
            return;
        }
    }
}

/// One sender: sends queued items until the lane is empty.
async fn send<K: Kind>(up: Upstream, lane: Arc<Lane<K>>, shard_id: String) {
    // If this task panics, the items it holds get an error through their dropped replies; the
    // guard gives the sender slot back so the lane keeps moving.
    let guard = Leave(&lane);
    let mut last = 0;
    loop {
        if !K::LINGER.is_zero() && last > 1 {
            linger(&lane, last, K::LINGER).await;
        }
        let Some((taken, weight)) = next(&lane) else { break };
        last = weight;
        let (items, replies): (Vec<K::Item>, Vec<Reply<K>>) = taken.into_iter().unzip();
        let results = match up.table().current() {
            Some(routing) => K::send(&up, routing, &shard_id, items).await,
            None => items.iter().map(|_| Err(UpstreamError::Unavailable("no topology yet".into()))).collect(),
        };
        for (reply, result) in replies.into_iter().zip(results) {
            // The client may have gone; its item was still handled like any other.
            let _ = reply.send(result);
        }
    }
    std::mem::forget(guard);
}

/// Gives a sender slot back when a sender unwinds.
struct Leave<'a, K: Kind>(&'a Lane<K>);

impl<K: Kind> Drop for Leave<'_, K> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.0.state.lock() {
            s.senders -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    fn lane() -> Arc<Lane<Reads>> {
        Arc::new(Lane {
            state: Mutex::new(LaneState { queue: Vec::new(), weight: 0, senders: 1 }),
            arrived: Notify::new(),
        })
    }

    /// What `submit` does when a sender is already running.
    fn queue(lane: &Lane<Reads>) {
        let (reply, _) = oneshot::channel();
        let mut s = lane.state.lock().unwrap();
        s.weight += 1;
        s.queue.push(((KeyRange { low: 0, high: 0 }, 0), reply));
        drop(s);
        lane.arrived.notify_one();
    }

    #[tokio::test(start_paused = true)]
    async fn a_sender_waits_for_as_many_items_as_it_last_carried() {
        let lane = lane();
        queue(&lane);
        let start = Instant::now();
        // Already enough queued: no wait.
        linger(&lane, 1, Duration::from_millis(5)).await;
        assert_eq!(start.elapsed(), Duration::ZERO);

        // Two more arrive 1 ms apart; the sender goes as soon as the third is queued.
        let l2 = Arc::clone(&lane);
        tokio::spawn(async move {
            for _ in 0..2 {
                tokio::time::sleep(Duration::from_millis(1)).await;
                queue(&l2);
            }
        });
        linger(&lane, 3, Duration::from_millis(5)).await;
        assert_eq!(start.elapsed(), Duration::from_millis(2));
        assert_eq!(next(&lane).map(|(t, w)| (t.len(), w)), Some((3, 3)));
        assert_eq!(lane.state.lock().unwrap().weight, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_sender_waits_no_longer_than_its_patience() {
        let lane = lane();
        queue(&lane);
        let start = Instant::now();
        linger(&lane, 10, Duration::from_millis(5)).await;
        assert_eq!(start.elapsed(), Duration::from_millis(5));
        assert_eq!(next(&lane).map(|(t, w)| (t.len(), w)), Some((1, 1)), "what was queued still goes");
        // An empty queue: the sender leaves.
        assert!(next(&lane).is_none());
        assert_eq!(lane.state.lock().unwrap().senders, 0);
    }
}
