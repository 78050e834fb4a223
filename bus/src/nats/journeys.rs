//! Journeys across processes. Every process answers queries on `chat.journal.query` (payload: a
//! message id) with what its journal remembers of that message; a gateway asked for a journey
//! publishes the query and gathers the answers that arrive within [`JOURNAL_GATHER`], leaving
//! out its own.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use protocol::subjects;
use telemetry::journal::{Journal, Journey};

use super::{unavailable, NatsBus};
use crate::BusError;

/// How long a journey query waits for other processes' answers.
const JOURNAL_GATHER: Duration = Duration::from_millis(300);

/// The message id a journey query asks about, if the payload is one.
fn query_id(payload: &[u8]) -> Option<uuid::Uuid> {
    uuid::Uuid::parse_str(std::str::from_utf8(payload).ok()?).ok()
}

/// Whether `journey` is another process's answer: a journey every hop of which was recorded by
/// `me` is this process's own answer to its query.
fn from_elsewhere(journey: &Journey, me: &str) -> bool {
    !journey.hops.iter().all(|hop| *hop.process == *me)
}

impl NatsBus {
    /// Answers journey queries from other processes with what `journal` remembers.
    pub async fn serve_journal(&self, journal: Arc<Journal>) -> Result<(), BusError> {
        let mut queries = self
            .client
            .subscribe(subjects::JOURNAL_QUERY)
            .await
            .map_err(|e| unavailable("subscribe to journal queries", e))?;
        let client = self.client.clone();
        tokio::spawn(async move {
            while let Some(query) = queries.next().await {
                let (Some(reply), Some(id)) = (query.reply, query_id(&query.payload)) else {
                    continue;
                };
                if let Some(journey) = journal.get(id) {
                    if let Ok(payload) = serde_json::to_vec(&journey) {
                        let _ = client.publish(reply, payload.into()).await;
                    }
                }
            }
        });
        Ok(())
    }

    /// Asks every process for a message's journey ([`GatewayBus::remote_journeys`]).
    ///
    /// [`GatewayBus::remote_journeys`]: crate::GatewayBus::remote_journeys
    pub(super) async fn gather_journeys(&self, id: uuid::Uuid) -> Vec<Journey> {
        let inbox = self.client.new_inbox();
        let Ok(mut replies) = self.client.subscribe(inbox.clone()).await else { return Vec::new() };
        if self.client.publish_with_reply(subjects::JOURNAL_QUERY, inbox, id.to_string().into()).await.is_err() {
            return Vec::new();
        }
        let mut journeys = Vec::new();
        let deadline = tokio::time::Instant::now() + JOURNAL_GATHER;
        while let Ok(Some(reply)) = tokio::time::timeout_at(deadline, replies.next()).await {
            match serde_json::from_slice::<Journey>(&reply.payload) {
                Ok(journey) if from_elsewhere(&journey, &self.config.name) => journeys.push(journey),
                Ok(_) => {}
                Err(e) => tracing::warn!(message_id = %id, error = %e, "undecodable journey reply ignored"),
            }
        }
        journeys
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use telemetry::journal::Hop;

    use super::*;

    fn journey(processes: &[&str]) -> Journey {
        Journey {
            id: None,
            trace_id: "0".repeat(32),
            hops: processes
                .iter()
                .map(|process| Hop {
                    process: Arc::from(*process),
                    hop: Cow::Borrowed("gateway.receive"),
                    at_us: 0,
                    detail: serde_json::Map::new(),
                })
                .collect(),
        }
    }

    #[test]
    fn a_query_names_a_message_id() {
        let id = uuid::Uuid::now_v7();
        assert_eq!(query_id(id.to_string().as_bytes()), Some(id));
        assert_eq!(query_id(b"not an id"), None);
        assert_eq!(query_id(b""), None);
        assert_eq!(query_id(&[0xff, 0xfe]), None);
    }

    #[test]
    fn only_other_processes_answers_are_gathered() {
        assert!(!from_elsewhere(&journey(&["gateway-1", "gateway-1"]), "gateway-1"));
        assert!(from_elsewhere(&journey(&["fanout-1"]), "gateway-1"));
        assert!(from_elsewhere(&journey(&["gateway-1", "fanout-1"]), "gateway-1"));
        // An empty answer tells nothing, whoever sent it.
        assert!(!from_elsewhere(&journey(&[]), "gateway-1"));
    }
}
