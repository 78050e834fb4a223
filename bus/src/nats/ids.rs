//! The ids a bus payload names even when it does not decode (sent by a process of another
//! version, say), so the line reporting it can still say which message or send it was.

use async_nats::HeaderMap;
use protocol::bus::{is_trace_id, trace_id_in};
use protocol::names;
use serde_json::Value;
use uuid::Uuid;

use super::TRACEPARENT;

/// A message's or send's ids, each only when present and well formed (so a trace id or
/// message id can be printed bare without letting a payload forge log fields).
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Named {
    /// The W3C trace id.
    pub trace_id: Option<String>,
    /// The message id (a stored message, or a reply carrying one).
    pub message_id: Option<Uuid>,
    /// The sender's idempotency key (a send before it has a message id).
    pub client_msg_id: Option<String>,
}

impl Named {
    /// Reads `payload` leniently (any JSON object: `trace_id`, `traceparent`, `id` and
    /// `client_msg_id` at its top level, or under `message` as in a send's reply) and the
    /// `traceparent` header, which wins. It parses the payload again, so only failure paths
    /// call it.
    pub(super) fn read(payload: &[u8], headers: Option<&HeaderMap>) -> Self {
        let value: Value = serde_json::from_slice(payload).unwrap_or_default();
        let object = value.get("message").filter(|m| m.is_object()).unwrap_or(&value);
        let text = |key: &str| object.get(key).and_then(Value::as_str);
        let from_header = headers.and_then(|h| h.get(TRACEPARENT)).map(|v| trace_id_in(v.as_str()));
        let trace_id = [from_header, text("trace_id"), text("traceparent").map(trace_id_in)]
            .into_iter()
            .flatten()
            .find(|id| is_trace_id(id))
            .map(str::to_owned);
        Self {
            trace_id,
            message_id: text("id").and_then(|id| Uuid::parse_str(id).ok()),
            client_msg_id: text("client_msg_id").filter(|id| names::is_valid_client_msg_id(id)).map(str::to_owned),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";

    #[test]
    fn a_send_that_does_not_decode_is_named_by_its_header_and_client_msg_id() {
        let mut headers = HeaderMap::new();
        headers.insert(TRACEPARENT, format!("00-{TRACE}-b7ad6b7169203331-01").as_str());
        let payload = br#"{"room":"r","client_msg_id":"c-1","deadline_ms":"soon"}"#;
        let named = Named::read(payload, Some(&headers));
        assert_eq!(named.trace_id.as_deref(), Some(TRACE));
        assert_eq!(named.client_msg_id.as_deref(), Some("c-1"));
        assert_eq!(named.message_id, None);
    }

    #[test]
    fn a_reply_or_delivery_is_named_by_its_message() {
        let id = Uuid::now_v7();
        let reply = format!(r#"{{"result":"stored","message":{{"id":"{id}","trace_id":"{TRACE}","seq":"x"}}}}"#);
        assert_eq!(
            Named::read(reply.as_bytes(), None),
            Named { trace_id: Some(TRACE.into()), message_id: Some(id), client_msg_id: None }
        );
        let delivery = format!(r#"{{"id":"{id}","traceparent":"00-{TRACE}-b7ad6b7169203331-01"}}"#);
        assert_eq!(Named::read(delivery.as_bytes(), None).trace_id.as_deref(), Some(TRACE));
    }

    #[test]
    fn the_trace_id_read_is_the_one_telemetry_gives_the_message() {
        let traceparent = telemetry::trace::to_traceparent(&telemetry::trace::message_context(None));
        let context = telemetry::trace::parse_traceparent(&traceparent).expect("a valid traceparent");
        assert_eq!(trace_id_in(&traceparent), telemetry::trace::trace_id(&context));
    }

    #[test]
    fn what_is_not_well_formed_is_left_out() {
        assert_eq!(Named::read(b"not json", None), Named::default());
        let forged = br#"{"id":"x message_id=1","trace_id":"abc trace_id=1","client_msg_id":"a\u0007"}"#;
        assert_eq!(Named::read(forged, None), Named::default());
    }
}
