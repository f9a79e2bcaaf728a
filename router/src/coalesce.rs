//! Write coalescing: concurrent clients' writes to the same shard travel to its primary together.
//!
//! Each shard has a lane: a queue of waiting batches and at most [`MAX_SENDERS`] requests in
//! flight. A write joins the queue; if the lane has fewer senders than that, it starts one. A
//! sender takes everything queued (up to [`MAX_OPS`] operations) as one `write_batches` request,
//! hands each client its own outcome, and repeats until the queue is empty. So a lone write goes
//! out at once, and under load the batches that piled up during one round trip share the next,
//! which is where the CPU went: one HTTP exchange and one wake-up of the shard's writer per client
//! write. Each batch keeps its own all-or-nothing outcome (the shard server decides them one by
//! one), so coalescing changes no answer.
//!
//! Senders are spawned tasks, not the clients' own futures: a client that disconnects must not
//! strand the batches of the others travelling with it. Does I/O (through [`upstream`]).

use crate::state::AppState;
use crate::upstream::{self, Batch, UpstreamError};
use shard_server::api::WriteResponse;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// Requests in flight per shard. Two keep the primary's writer fed while an answer travels back.
pub const MAX_SENDERS: usize = 2;
/// Most operations in one request (a single larger batch still goes, alone).
pub const MAX_OPS: usize = 2048;

type Reply = oneshot::Sender<Result<WriteResponse, UpstreamError>>;

#[derive(Default)]
pub struct Lanes {
    lanes: Mutex<HashMap<String, Arc<Lane>>>,
}

#[derive(Default)]
struct Lane {
    state: Mutex<LaneState>,
}

#[derive(Default)]
struct LaneState {
    queue: Vec<(Batch, Reply)>,
    senders: usize,
}

impl Lanes {
    /// Writes `batch` to `shard_id` through its lane and waits for its own outcome.
    pub async fn submit(&self, state: &AppState, shard_id: &str, batch: Batch) -> Result<WriteResponse, UpstreamError> {
        let lane = self.lanes.lock().expect("lock").entry(shard_id.to_owned()).or_default().clone();
        let (reply, outcome) = oneshot::channel();
        let start = {
            let mut s = lane.state.lock().expect("lock");
            s.queue.push((batch, reply));
            let start = s.senders < MAX_SENDERS;
            s.senders += usize::from(start);
            start
        };
        if start {
            tokio::spawn(send(state.clone(), lane, shard_id.to_owned()));
        }
        outcome.await.unwrap_or_else(|_| Err(UpstreamError::Internal(format!("shard {shard_id}: write lane failed"))))
    }
}

/// Takes the next request's worth of batches off the queue, or `None` (and leaves) when it is
/// empty. Deciding under the lock that the queue is empty and leaving is one step, so a batch
/// queued just after always finds a sender or starts one.
fn next(lane: &Lane) -> Option<Vec<(Batch, Reply)>> {
    let mut s = lane.state.lock().expect("lock");
    if s.queue.is_empty() {
        s.senders -= 1;
        return None;
    }
    let mut ops = 0;
    let take = s
        .queue
        .iter()
        .take_while(|(b, _)| {
            ops += b.ops.len();
            ops <= MAX_OPS
        })
        .count()
        .max(1);
    Some(s.queue.drain(..take).collect())
}

/// One sender: sends queued batches until the lane is empty.
async fn send(state: AppState, lane: Arc<Lane>, shard_id: String) {
    // If this task panics, the batches it holds get an error through their dropped replies; the
    // guard gives the sender slot back so the lane keeps moving.
    let guard = Leave(&lane);
    while let Some(taken) = next(&lane) {
        let (batches, replies): (Vec<Batch>, Vec<Reply>) = taken.into_iter().unzip();
        let results = match state.table().current() {
            Some(routing) => upstream::write_batches(&state, routing, &shard_id, batches, false).await,
            None => batches.iter().map(|_| Err(UpstreamError::Unavailable("no topology yet".into()))).collect(),
        };
        for (reply, result) in replies.into_iter().zip(results) {
            // The client may have gone; its batch was still written (or not) like any other.
            let _ = reply.send(result);
        }
    }
    std::mem::forget(guard);
}

/// Gives a sender slot back when a sender unwinds.
struct Leave<'a>(&'a Lane);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.0.state.lock() {
            s.senders -= 1;
        }
    }
}
