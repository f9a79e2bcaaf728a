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
//! Senders are spawned tasks, not the clients' own futures: a client that disconnects must not
//! strand the items of the others travelling with it. Does I/O (through [`upstream`]).

use crate::state::{AppState, Routing};
use crate::upstream::{self, Batch, UpstreamError};
use serde_json::value::RawValue;
use shard_server::api::{KeyRange, WriteResponse};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// What travels in one kind of lane and how a request of it is sent.
pub trait Kind: Send + Sync + 'static {
    type Item: Send + 'static;
    type Out: Send + 'static;
    /// Requests in flight per shard.
    const MAX_SENDERS: usize;
    /// Most weight (see [`Kind::weight`]) in one request; a single heavier item still goes, alone.
    const MAX_WEIGHT: usize;
    fn weight(item: &Self::Item) -> usize;
    /// Sends `items` to shard `shard_id` as one request (retrying as the upstream policy says);
    /// one outcome per item, in order.
    fn send(
        state: &AppState,
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
    fn weight(item: &Batch) -> usize {
        item.ops.len()
    }
    async fn send(
        state: &AppState,
        routing: Arc<Routing>,
        shard_id: &str,
        items: Vec<Batch>,
    ) -> Vec<Result<WriteResponse, UpstreamError>> {
        upstream::write_batches(state, routing, shard_id, items, false).await
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
    fn weight(_: &(KeyRange, u64)) -> usize {
        1
    }
    async fn send(
        state: &AppState,
        routing: Arc<Routing>,
        shard_id: &str,
        items: Vec<(KeyRange, u64)>,
    ) -> Vec<Result<Box<RawValue>, UpstreamError>> {
        let request = items.first().map_or(0, |i| i.1);
        let ranges: Vec<KeyRange> = items.iter().map(|i| i.0).collect();
        match upstream::read_ranges(state, routing, shard_id, &ranges, request).await {
            Ok(parts) => parts.into_iter().map(Ok).collect(),
            Err(e) => items.iter().map(|_| Err(e.clone())).collect(),
        }
    }
}

type Reply<K> = oneshot::Sender<Result<<K as Kind>::Out, UpstreamError>>;

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
}

struct LaneState<K: Kind> {
    queue: Vec<(K::Item, Reply<K>)>,
    senders: usize,
}

impl<K: Kind> Lanes<K> {
    /// Sends `item` to `shard_id` through its lane and waits for its own outcome.
    pub async fn submit(&self, state: &AppState, shard_id: &str, item: K::Item) -> Result<K::Out, UpstreamError> {
        let lane =
            Arc::clone(
                self.lanes.lock().expect("lock").entry(shard_id.to_owned()).or_insert_with(|| {
                    Arc::new(Lane { state: Mutex::new(LaneState { queue: Vec::new(), senders: 0 }) })
                }),
            );
        let (reply, outcome) = oneshot::channel();
        let start = {
            let mut s = lane.state.lock().expect("lock");
            s.queue.push((item, reply));
            let start = s.senders < K::MAX_SENDERS;
            s.senders += usize::from(start);
            start
        };
        if start {
            tokio::spawn(send(state.clone(), lane, shard_id.to_owned()));
        }
        outcome.await.unwrap_or_else(|_| Err(UpstreamError::Internal(format!("shard {shard_id}: lane failed"))))
    }
}

/// Takes the next request's worth of items off the queue, or `None` (and leaves) when it is
/// empty. Deciding under the lock that the queue is empty and leaving is one step, so an item
/// queued just after always finds a sender or starts one.
fn next<K: Kind>(lane: &Lane<K>) -> Option<Vec<(K::Item, Reply<K>)>> {
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
    Some(s.queue.drain(..take).collect())
}

/// One sender: sends queued items until the lane is empty.
async fn send<K: Kind>(state: AppState, lane: Arc<Lane<K>>, shard_id: String) {
    // If this task panics, the items it holds get an error through their dropped replies; the
    // guard gives the sender slot back so the lane keeps moving.
    let guard = Leave(&lane);
    while let Some(taken) = next(&lane) {
        let (items, replies): (Vec<K::Item>, Vec<Reply<K>>) = taken.into_iter().unzip();
        let results = match state.table().current() {
            Some(routing) => K::send(&state, routing, &shard_id, items).await,
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
