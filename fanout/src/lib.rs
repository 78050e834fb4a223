//! The fanout worker: takes submitted sends off the bus in batches, gives each its per-room
//! `seq`, stores it, delivers it to the gateways following the room, and answers the sender.
//!
//! Sequencing is fenced by the store: an append names the room's last seq it sequenced from
//! and fails with a conflict when another writer moved it, so a seq is never given twice even
//! when two workers briefly handle the same room. Rooms of one batch are sequenced
//! concurrently, and a store that groups commits (the embedded one does) turns them into one
//! durable write.
//!
//! A worker can write a [`decision_log`] of what it saw and decided; [`replay`] runs the
//! sequencer again on such a log, offline, and says whether it decides the same.

mod clock;
mod config;
pub mod decision_log;
pub mod replay;
mod room_hook;
mod sequencer;

pub use clock::{Clock, IdSource, SystemClock, V7Ids};
pub use config::FanoutConfig;
pub use room_hook::{Entered, RoomHook};
pub use sequencer::Fanout;
