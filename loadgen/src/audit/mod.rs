//! The delivery auditor: checks that every acked message reached every member that was joined
//! the whole time (from before the send until the end), exactly once, in seq order, with no gap.
//!
//! It is built to be cheap enough to check every delivery of a large run:
//! - per message a compact [`MsgRecord`] (room, scheduled and sent time, ack id/seq/time, the id
//!   and trace id seen at the first delivery), shared by all clients without locks (atomics and
//!   `OnceLock`s, each written once);
//! - per recipient per room a [`Track`] owned by that client's task: the last seq seen plus the
//!   list of open holes (normally empty). A delivery costs one comparison; no per-delivery object
//!   is stored. Duplicates and reorders are written down as events the moment they happen.
//!
//! [`finalize`] turns records and tracks into [`AuditResult`]: which member was expected to get
//! which message, and what went wrong, naming message ids, rooms, seqs and trace ids.
//!
//! Where things are:
//! - `records`: what was sent, acked, rejected and first seen, per send ([`Records`]);
//! - `track`: one recipient's view of one room, classifying each delivery ([`Track`]);
//! - `check`: one `message` frame at one recipient, the hot path ([`check_delivery`]);
//! - `findings`: what the audit reports ([`AuditResult`], [`Finding`], [`FindingKind`]);
//! - `verdict`: records and tracks in, [`AuditResult`] out ([`finalize`]);
//! - `ids`: message and trace ids as bytes and as text.
//!
//! Definitions (also in docs/loadgen.md):
//! - a member is *audited* when it was joined at the end; it *expects* an acked message when its
//!   continuous membership began (its `joined` frame arrived) before the `send` was written.
//!   A reconnect that rejoins with `since` keeps the membership continuous.
//! - **missing**: an expected member never got the message.
//! - **duplicate**: a member got a seq it already had.
//! - **reordered**: a member got a seq after a higher one (it filled a hole late).
//! - **gap**: a member got seq n+k (k > 1) after n and never got the seqs between.
//! - **unacked**: a send got neither an `ack` nor an `error` by the end of the drain.
//! - **stored_twice**: one `client_msg_id` got two different ids/seqs (idempotency broken).
//! - **refused_but_delivered**: the server answered a send with an `error` frame (which says it
//!   was not stored), yet the message was delivered.
//! - **unknown_then_stored** (listed, not a failure): the server answered a send `internal`,
//!   which promises nothing about storage (docs/protocol.md), and the message was delivered.
//! - **rejected** (listed, not a failure): the server answered a send with an `error` frame and
//!   the message never arrived.
//! - **chain_altered**: a member got a message whose chain digest does not match its fields.
//! - **equivocation**: members got two versions of one seq (the next message chains to another
//!   one, or recipients got different digests); see `chain`.

mod chain;
mod check;
mod findings;
mod ids;
mod records;
#[cfg(test)]
mod sim;
mod track;
mod verdict;

pub use chain::{check_chain, ChainHead, Chained};
pub use check::check_delivery;
pub use findings::{AuditResult, Finding, FindingCounts, FindingKind};
pub use ids::{fmt_id, fmt_trace, parse_id, parse_trace};
pub use records::{AckInfo, AckOutcome, MsgRecord, Records, Seen};
pub use track::{Delivery, Track, TrackEvent, TrackProgress};
pub use verdict::finalize;

/// Recipients named per finding; counts stay exact.
const RECIPIENTS_PER_FINDING: usize = 10;
