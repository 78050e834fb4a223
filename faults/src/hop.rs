//! The hops where a fault can be injected, and what each can do.

use std::fmt;

use serde::{Deserialize, Serialize};

/// What a fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultAction {
    /// The event never happens (a delivery or a publish is lost).
    Drop,
    /// The event happens twice.
    Duplicate,
    /// The message is held back and written after the room's next message.
    Reorder,
    /// The event waits `delay_ms` first.
    Delay,
    /// The body is altered before it is written (a lying gateway; its chain digest is left as
    /// it was, so the message fails its self-check).
    Rewrite,
    /// A worker stores the true message but publishes a forged copy: body rewritten and chain
    /// digest recomputed over it (a competent liar that passes the self-check; the next message
    /// of the room no longer links to it, and history has the true one).
    Equivocate,
    /// A worker publishes a stored message under the next seq, its digest left as it was (a
    /// forged seq: the message fails its self-check, shows twice, and the room's true next
    /// message is taken for a repeat).
    ForgeSeq,
    /// A worker holds a room's sends for `delay_ms` before sequencing them.
    Stall,
    /// The process acts as if cut off from the bus.
    Cut,
    /// A safety mechanism (gap repair) is switched off.
    Disable,
    /// A worker's clock runs `delay_ms` off.
    Skew,
    /// A worker sequencing the fault's room also locks `with_room` (a lock-order inversion:
    /// two such faults the other way round deadlock the worker).
    CrossLock,
}

impl FaultAction {
    /// The action's name, as in the API and the `action` metric label.
    pub fn name(self) -> &'static str {
        match self {
            Self::Drop => "drop",
            Self::Duplicate => "duplicate",
            Self::Reorder => "reorder",
            Self::Delay => "delay",
            Self::Rewrite => "rewrite",
            Self::Equivocate => "equivocate",
            Self::ForgeSeq => "forge_seq",
            Self::Stall => "stall",
            Self::Cut => "cut",
            Self::Disable => "disable",
            Self::Skew => "skew",
            Self::CrossLock => "cross_lock",
        }
    }
}

/// A place in the message path where faults are injected.
///
/// | hop | actions | where |
/// |---|---|---|
/// | `gateway.deliver` | drop, duplicate, reorder, delay, rewrite | a gateway writing a message to one connection |
/// | `gateway.feed` | drop, delay | a gateway receiving a room's message from the bus |
/// | `gateway.gap_repair` | disable | a gateway's gap repair (hub and connections) |
/// | `gateway.resubscribe` | drop | a gateway restoring a room's subscription after a bus reconnect: not restored |
/// | `gateway.outbox` | drop | connections opened while armed: a queue of one frame, and what a full queue skips is dropped, never caught up from the store (a slow-consumer policy set to drop) |
/// | `gateway.nats` | cut | a gateway's whole bus connection: sends `unavailable`, feeds dropped, not ready |
/// | `gateway.answer` | delay, drop | a gateway taking in a worker's `Stored` answer to a send: held, or lost (the gateway then answers `internal`, not known yet, at the send's deadline) |
/// | `fanout.publish` | drop, duplicate, delay, equivocate, forge_seq | a worker publishing a stored message to gateways |
/// | `fanout.sequence` | stall, delay | a worker before sequencing a room's sends (the rest of its batch waits too) |
/// | `fanout.clock` | skew | a worker stamping `ts` (`delay_ms` ahead; negative: behind) |
/// | `fanout.lock` | cross_lock | a worker sequencing `room` also locks `with_room`, holding its own |
/// | `fanout.heartbeat` | drop | a worker's heartbeat on `chat.workers` (each second) is not published; no `room` |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Hop {
    /// A gateway writing a message to one connection.
    #[serde(rename = "gateway.deliver")]
    GatewayDeliver,
    /// A gateway receiving a room's message from the bus.
    #[serde(rename = "gateway.feed")]
    GatewayFeed,
    /// A gateway's gap repair.
    #[serde(rename = "gateway.gap_repair")]
    GatewayGapRepair,
    /// A gateway restoring a room's subscription after a bus reconnect.
    #[serde(rename = "gateway.resubscribe")]
    GatewayResubscribe,
    /// A gateway's slow-consumer policy for the connections it opens.
    #[serde(rename = "gateway.outbox")]
    GatewayOutbox,
    /// A gateway's whole bus connection.
    #[serde(rename = "gateway.nats")]
    GatewayNats,
    /// A gateway taking in a worker's answer to a send.
    #[serde(rename = "gateway.answer")]
    GatewayAnswer,
    /// A worker publishing a stored message.
    #[serde(rename = "fanout.publish")]
    FanoutPublish,
    /// A worker about to sequence a room's sends.
    #[serde(rename = "fanout.sequence")]
    FanoutSequence,
    /// A worker's clock stamping `ts`.
    #[serde(rename = "fanout.clock")]
    FanoutClock,
    /// A worker's room locks while it sequences.
    #[serde(rename = "fanout.lock")]
    FanoutLock,
    /// A worker announcing itself to the other workers.
    #[serde(rename = "fanout.heartbeat")]
    FanoutHeartbeat,
}

impl Hop {
    /// Every hop.
    pub const ALL: [Hop; 12] = [
        Hop::GatewayDeliver,
        Hop::GatewayFeed,
        Hop::GatewayGapRepair,
        Hop::GatewayResubscribe,
        Hop::GatewayOutbox,
        Hop::GatewayNats,
        Hop::GatewayAnswer,
        Hop::FanoutPublish,
        Hop::FanoutSequence,
        Hop::FanoutClock,
        Hop::FanoutLock,
        Hop::FanoutHeartbeat,
    ];

    /// The hop's name, as in the API, journeys and the `hop` metric label.
    pub fn name(self) -> &'static str {
        match self {
            Hop::GatewayDeliver => "gateway.deliver",
            Hop::GatewayFeed => "gateway.feed",
            Hop::GatewayGapRepair => "gateway.gap_repair",
            Hop::GatewayResubscribe => "gateway.resubscribe",
            Hop::GatewayOutbox => "gateway.outbox",
            Hop::GatewayNats => "gateway.nats",
            Hop::GatewayAnswer => "gateway.answer",
            Hop::FanoutPublish => "fanout.publish",
            Hop::FanoutSequence => "fanout.sequence",
            Hop::FanoutClock => "fanout.clock",
            Hop::FanoutLock => "fanout.lock",
            Hop::FanoutHeartbeat => "fanout.heartbeat",
        }
    }

    /// The actions a fault at this hop may take.
    pub fn actions(self) -> &'static [FaultAction] {
        use FaultAction::*;
        match self {
            Hop::GatewayDeliver => &[Drop, Duplicate, Reorder, Delay, Rewrite],
            Hop::GatewayFeed => &[Drop, Delay],
            Hop::GatewayGapRepair => &[Disable],
            Hop::GatewayResubscribe | Hop::GatewayOutbox => &[Drop],
            Hop::GatewayNats => &[Cut],
            Hop::GatewayAnswer => &[Delay, Drop],
            Hop::FanoutPublish => &[Drop, Duplicate, Delay, Equivocate, ForgeSeq],
            Hop::FanoutSequence => &[Stall, Delay],
            Hop::FanoutClock => &[Skew],
            Hop::FanoutLock => &[CrossLock],
            Hop::FanoutHeartbeat => &[Drop],
        }
    }
}

impl Hop {
    /// Whether a fault here can be limited to one room (a heartbeat is no room's).
    pub fn has_rooms(self) -> bool {
        self != Hop::FanoutHeartbeat
    }
}

impl fmt::Display for Hop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_serde() {
        for hop in Hop::ALL {
            let json = serde_json::to_string(&hop).unwrap();
            assert_eq!(json, format!("\"{}\"", hop.name()));
            assert_eq!(serde_json::from_str::<Hop>(&json).unwrap(), hop);
        }
        assert!(serde_json::from_str::<Hop>("\"gateway.nowhere\"").is_err());
    }
}
