//! W3C trace context for messages.
//!
//! Every message belongs to one trace. The gateway starts it (or joins the `traceparent` a
//! client sent), and every later hop parents its span on the context carried in the message
//! envelope or NATS headers, so all hops share the message's `trace_id`.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt, TraceFlags, TraceState};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};

pub use opentelemetry::Context;

/// The header (and envelope field) carrying the W3C trace context.
pub const TRACEPARENT: &str = "traceparent";

/// A carrier of one `traceparent` for the W3C propagator: read from a borrowed value, written
/// into an owned one. A map as carrier costs a table and two strings per message.
#[derive(Default)]
struct Traceparent<'a> {
    given: &'a str,
    made: Option<String>,
}

impl Extractor for Traceparent<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == TRACEPARENT).then_some(self.given)
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT]
    }
}

impl Injector for Traceparent<'_> {
    fn set(&mut self, key: &str, value: String) {
        if key == TRACEPARENT {
            self.made = Some(value);
        }
    }
}

/// Parses a `traceparent` value; `None` when it is absent or not valid W3C.
pub fn parse_traceparent(value: &str) -> Option<Context> {
    let context = TraceContextPropagator::new().extract(&Traceparent { given: value, made: None });
    context.span().span_context().is_valid().then_some(context)
}

/// The context a new message's trace starts from: the client's `traceparent` when it sent a
/// valid one (the message joins that trace), otherwise a fresh, sampled trace.
pub fn message_context(client_traceparent: Option<&str>) -> Context {
    if let Some(context) = client_traceparent.and_then(parse_traceparent) {
        return context;
    }
    let ids = RandomIdGenerator::default();
    let span =
        SpanContext::new(ids.new_trace_id(), ids.new_span_id(), TraceFlags::SAMPLED, true, TraceState::default());
    Context::new().with_remote_span_context(span)
}

/// The `traceparent` header value of a context.
pub fn to_traceparent(context: &Context) -> String {
    let mut carrier = Traceparent::default();
    TraceContextPropagator::new().inject_context(context, &mut carrier);
    carrier.made.unwrap_or_default()
}

/// The 32-hex-digit trace id of a context.
pub fn trace_id(context: &Context) -> String {
    context.span().span_context().trace_id().to_string()
}

/// The `traceparent` of a span's own context, when the OpenTelemetry layer records it (a
/// message keeps the one it carried when it does not).
pub fn span_traceparent(span: &tracing::Span) -> Option<String> {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let context = span.context();
    context.span().span_context().is_valid().then(|| to_traceparent(&context))
}

/// Makes `span` a child of `parent` (a message's context) for the OpenTelemetry layer.
pub fn set_parent(span: &tracing::Span, parent: Context) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    // Fails only when no OpenTelemetry layer is installed; then there is nothing to parent.
    let _ = span.set_parent(parent);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_trace_round_trips() {
        let context = message_context(None);
        let header = to_traceparent(&context);
        assert!(header.starts_with("00-"), "{header}");
        assert_eq!(parse_traceparent(&header).map(|parsed| trace_id(&parsed)), Some(trace_id(&context)));
        assert_eq!(trace_id(&context).len(), 32);
    }

    #[test]
    fn joins_client_trace() {
        let client = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = message_context(Some(client));
        assert_eq!(trace_id(&context), "4bf92f3577b34da6a3ce929d0e0e4736");
        let garbage = message_context(Some("nonsense"));
        assert_ne!(trace_id(&garbage), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(trace_id(&garbage), "0".repeat(32));
    }
}
