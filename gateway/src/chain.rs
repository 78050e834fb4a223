//! The gateway's side of the message chain (docs/protocol.md, extension "Message chain"): each
//! room's hub checks every message it forwards (self-check, and the link to the seq before it);
//! history read from the store for a client is checked page by page; a delivery the delivery
//! hook replaced is self-checked before it is written. A violation is observed, never acted on:
//! the message is still delivered, and the gateway counts it
//! (`chat_chain_violations_total{kind,source}`), records a `chain.violation` hop in the
//! message's journey and logs a warning naming it.

use std::sync::Arc;

use protocol::chain::{ChainError, RoomChain};
use protocol::ChatMessage;
use telemetry::journal::Journal;
use telemetry::metrics::Metrics;
use uuid::Uuid;

/// Where a gateway met a message that failed a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A room's feed: from the bus, or filled in by gap repair.
    Feed,
    /// What this gateway's delivery stage made of a message, about to be written.
    Deliver,
    /// A page of history read from the store for a client (`history`, a join's replay).
    History,
}

impl Source {
    /// Its name, as in the `source` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Feed => "feed",
            Self::Deliver => "deliver",
            Self::History => "history",
        }
    }
}

/// The message before a fork, as the gateway received it: named in the report too.
#[derive(Debug, Clone)]
pub struct Previous {
    /// Its id.
    pub id: Uuid,
    /// Its trace id.
    pub trace_id: String,
}

/// Reports chain violations: counted, journaled and logged.
#[derive(Clone)]
pub struct ChainWatch {
    gateway_id: String,
    metrics: Metrics,
    journal: Arc<Journal>,
}

impl ChainWatch {
    /// A watch for gateway `gateway_id`.
    pub fn new(gateway_id: &str, metrics: Metrics, journal: Arc<Journal>) -> Self {
        Self { gateway_id: gateway_id.to_owned(), metrics, journal }
    }

    /// Self-checks a delivery about to be written (one the delivery hook put in place of the
    /// message it was given).
    pub fn check_delivery(&self, message: &ChatMessage) {
        if let Err(error) = protocol::chain::check(message) {
            self.report(message, &error, Source::Deliver, None);
        }
    }

    /// Checks a page of history read from the store: each message, and the links between
    /// consecutive ones.
    pub fn check_page(&self, messages: &[ChatMessage]) {
        let mut chain = RoomChain::new();
        let mut previous: Option<&ChatMessage> = None;
        for message in messages {
            if let Err(error) = chain.observe(message) {
                let before = previous.filter(|p| p.seq + 1 == message.seq);
                let before = before.map(|p| Previous { id: p.id, trace_id: p.trace_id.clone() });
                self.report(message, &error, Source::History, before);
            }
            previous = Some(message);
        }
    }

    /// Counts, journals and logs one violation. For a fork, `previous` (the message the gateway
    /// holds at seq - 1) gets a `chain.violation` hop too, since one of the two lies.
    pub fn report(&self, message: &ChatMessage, error: &ChainError, source: Source, previous: Option<Previous>) {
        // Only a fork implicates the message before: an altered message fails on its own.
        let previous = previous.filter(|_| error.kind() == protocol::chain::ViolationKind::Fork);
        let kind = error.kind().as_str();
        self.metrics.chain_violations.with_label_values(&[kind, source.as_str()]).inc();
        let mut detail = serde_json::json!({
            "gateway": self.gateway_id,
            "kind": kind,
            "source": source.as_str(),
            "seq": message.seq,
            "expected": error.expected(),
            "got": error.got(),
        });
        // The worker that published the suspect (for a fork, the message before), when this
        // process's journal has it (the all-in-one; in a cluster the journey's `fanout.publish`
        // hop, gathered from the worker, names it).
        let suspect = previous.as_ref().map_or(message.id, |p| p.id);
        if let Some(publisher) = self.publisher(suspect) {
            detail["publisher"] = serde_json::json!(publisher);
        }
        if let Some(previous) = &previous {
            detail["previous_id"] = serde_json::json!(previous.id);
            let mut before = detail.clone();
            before["seq"] = serde_json::json!(message.seq.saturating_sub(1));
            before["next_id"] = serde_json::json!(message.id);
            if let Some(map) = before.as_object_mut() {
                map.remove("previous_id");
            }
            self.journal.record(previous.id, &previous.trace_id, "chain.violation", before);
        }
        self.journal.record(message.id, &message.trace_id, "chain.violation", detail);
        tracing::warn!(
            room = %message.room,
            seq = message.seq,
            kind,
            source = source.as_str(),
            expected = error.expected(),
            got = error.got(),
            previous_id = previous.as_ref().map(|p| tracing::field::display(p.id)),
            trace_id = %message.trace_id,
            message_id = %message.id,
            "message chain violation: {error}"
        );
    }

    /// The process that recorded the `fanout.publish` hop of message `id` here, if one did.
    fn publisher(&self, id: Uuid) -> Option<String> {
        let journey = self.journal.get(id)?;
        journey.hops.iter().find(|hop| hop.hop == "fanout.publish").map(|hop| hop.process.to_string())
    }
}
