//! Logging and tracing setup: `tracing` to stderr as text or JSON (filtered by `RUST_LOG`,
//! default `info`), and, when an OTLP endpoint is given, every message's hop spans exported
//! with OTLP to any collector (Jaeger, Tempo, ...).
//!
//! The standard variables apply: `OTEL_EXPORTER_OTLP_ENDPOINT` (the `--otlp-endpoint` flag's
//! twin), `OTEL_EXPORTER_OTLP_PROTOCOL` (`grpc` or `http/protobuf`, the default),
//! `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Target of the per-hop message spans: exported over OTLP, never printed as logs.
pub const HOP_TARGET: &str = "chat_hops";

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, with span fields (message ids, trace ids).
    Json,
}

/// Keeps the span exporter alive; flushes and stops it on drop.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(e) = provider.shutdown() {
                eprintln!("flushing spans failed: {e}");
            }
        }
    }
}

/// Why tracing could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("tracing set-up: {0}")]
pub struct TracingError(String);

/// Installs the global subscriber: logs, plus OTLP span export when `otlp_endpoint` is set.
/// `service` names the process when `OTEL_SERVICE_NAME` does not. Must run inside a Tokio
/// runtime when exporting.
pub fn init(format: LogFormat, otlp_endpoint: Option<&str>, service: &str) -> Result<TelemetryGuard, TracingError> {
    // Hop spans are for the tracing backend; they never become log lines. One filter per layer
    // keeps the subscriber's level hint exact, so disabled `log` records (tungstenite traces
    // every frame) and events stop at a cheap level check instead of reaching the filters.
    let hops_off = format!("{HOP_TARGET}=off").parse().map_err(|e| TracingError(format!("log filter: {e}")))?;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")).add_directive(hops_off);
    let fmt = match format {
        // Colours only on a terminal: a log file or a collector gets plain text to grep.
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => {
            tracing_subscriber::fmt::layer().json().with_current_span(true).with_writer(std::io::stderr).boxed()
        }
    }
    .with_filter(filter);
    let (otel, provider) = match otlp_endpoint.filter(|e| !e.is_empty()) {
        Some(endpoint) => {
            let provider = tracer_provider(endpoint, service)?;
            let tracer = provider.tracer("chat");
            let layer = tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(Targets::new().with_target(HOP_TARGET, tracing::Level::INFO));
            (Some(layer), Some(provider))
        }
        None => (None, None),
    };
    let _ = tracing_subscriber::registry().with(fmt).with(otel).try_init();
    Ok(TelemetryGuard { provider })
}

fn tracer_provider(endpoint: &str, service: &str) -> Result<SdkTracerProvider, TracingError> {
    let protocol = std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").unwrap_or_else(|_| "http/protobuf".into());
    let exporter = match protocol.as_str() {
        "grpc" => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_protocol(Protocol::Grpc)
            .build(),
        "http/protobuf" => {
            let base = endpoint.trim_end_matches('/');
            let url = if base.ends_with("/v1/traces") { base.to_owned() } else { format!("{base}/v1/traces") };
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(url)
                .with_protocol(Protocol::HttpBinary)
                .build()
        }
        other => return Err(TracingError(format!("OTEL_EXPORTER_OTLP_PROTOCOL={other}: use grpc or http/protobuf"))),
    }
    .map_err(|e| TracingError(format!("OTLP exporter: {e}")))?;
    let processor = opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
        exporter,
        opentelemetry_sdk::runtime::Tokio,
    )
    .build();
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_owned());
    }
    Ok(SdkTracerProvider::builder().with_span_processor(processor).with_resource(resource.build()).build())
}
