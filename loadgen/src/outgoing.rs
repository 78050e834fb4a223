//! Scheduled sends on their way out, the same for every client protocol: a send is written at
//! once when the client is ready and nothing waits before it; otherwise it waits, in order, in
//! a bounded backlog that is written as soon as the writer has room again. Latency still counts
//! from the scheduled instant.

use std::collections::VecDeque;

use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use crate::audit::MsgRecord;
use crate::metrics::Lat;
use crate::runner::Shared;

/// A client's side of its scheduled sends. The protocol writes one send
/// ([`write_one`](Self::write_one)); the order and the backlog are shared.
pub(crate) trait ScheduledSends {
    /// The run's shared state.
    fn shared(&self) -> &Shared;
    /// This client's index.
    fn idx(&self) -> u32;
    /// Whether the client's rooms are joined, so sends may be written.
    fn ready(&self) -> bool;
    /// Sends scheduled and not written yet.
    fn backlog(&mut self) -> &mut VecDeque<u32>;
    /// Writes send `i` if the writer has room; false when it is full.
    fn write_one(&mut self, i: u32, tx: &mpsc::Sender<Message>) -> bool;

    /// Writes scheduled send `i` now, or keeps it in the backlog when offline, not ready, behind
    /// other sends or the writer is full.
    fn send(&mut self, i: u32, tx: Option<&mpsc::Sender<Message>>) {
        match tx {
            Some(tx) if self.ready() && self.backlog().is_empty() => {
                if !self.write_one(i, tx) {
                    self.enqueue(i);
                }
            }
            _ => self.enqueue(i),
        }
    }

    /// Keeps send `i` for later; a full backlog counts the send as a `loadgen_backlog` error.
    fn enqueue(&mut self, i: u32) {
        if self.backlog().len() >= self.shared().config.queue {
            self.shared().metrics.error(self.idx(), "loadgen_backlog");
        } else {
            self.backlog().push_back(i);
        }
    }

    /// Writes the backlog in order until the writer is full.
    fn flush_backlog(&mut self, tx: &mpsc::Sender<Message>) {
        while let Some(&i) = self.backlog().front() {
            if !self.write_one(i, tx) {
                break;
            }
            self.backlog().pop_front();
        }
    }
}

/// Notes that send `i` (scheduled as `rec`) is being written now by client `idx`: the first
/// write counts it as sent, with its lag behind the schedule.
pub(crate) fn note_written(shared: &Shared, idx: u32, i: u32, rec: &MsgRecord) {
    let now = shared.clock.now_us();
    if shared.records.mark_sent(i, now) {
        let mut shard = shared.metrics.shard(idx);
        shard.sent += 1;
        shard.record(Lat::Lag, now.saturating_sub(shared.records.scheduled_at(rec)));
    }
}
