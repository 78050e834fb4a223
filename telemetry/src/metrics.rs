//! The metric catalogue (documented in docs/metrics.md). Every label has a small, fixed set of
//! values, so cardinality stays bounded whatever clients send.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// Latency buckets in seconds, 100 µs to 10 s.
const LATENCY_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// Every metric this system exports, registered in one registry per process.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Open WebSocket connections.
    pub connections: IntGauge,
    /// WebSocket connections accepted.
    pub connections_total: IntCounter,
    /// Connections refused or closed by the server, by reason.
    pub disconnects: IntCounterVec,
    /// Client frames received, by frame type (`invalid` for unparseable ones).
    pub frames_received: IntCounterVec,
    /// `error` frames sent, by code.
    pub errors_sent: IntCounterVec,
    /// Successful joins.
    pub joins: IntCounter,
    /// Sends by outcome: `acked`, `duplicate`, `unavailable`, `rejected`.
    pub sends: IntCounterVec,
    /// `message` frames written to connections.
    pub deliveries: IntCounter,
    /// Deliveries or frames not delivered, by reason.
    pub drops: IntCounterVec,
    /// Gaps in a room's feed filled from the store.
    pub gap_repairs: IntCounter,
    /// Messages recovered by gap repair.
    pub gap_repaired_messages: IntCounter,
    /// Time from a gateway receiving a `send` to sending its `ack`.
    pub send_to_ack: Histogram,
    /// Time from sequencing to the gateway handing the message to its connections.
    pub sequence_to_gateway: Histogram,
    /// Messages sequenced by fanout.
    pub sequenced: IntCounter,
    /// Store operation latency, by operation.
    pub store_latency: HistogramVec,
    /// Store errors, by operation.
    pub store_errors: IntCounterVec,
    /// Sequencing conflicts (another writer moved the room's seq first).
    pub seq_conflicts: IntCounter,
    /// Sends the bus handed to a worker again (held past the ack deadline, or a worker died).
    pub send_redeliveries: IntCounter,
    /// Sends per fanout batch.
    pub fanout_batch: Histogram,
    /// History reads answered by joining an identical read already in flight.
    pub history_coalesced: IntCounter,
    /// Replays and gap fills answered from a room's recent messages in memory.
    pub history_cache_hits: IntCounter,
    /// Faults injected, by hop and action.
    pub faults_injected: IntCounterVec,
    /// Bus operation latency, by operation.
    pub bus_latency: HistogramVec,
    /// Frames waiting in a connection's outbound queue when its writer wakes up.
    pub outbound_queue_depth: Histogram,
    /// Age of the oldest message of each write batch (now − `ts`): per-connection delivery lag.
    pub delivery_lag: Histogram,
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let metric = IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    register(registry, metric)
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    register(registry, metric)
}

fn histogram(registry: &Registry, name: &str, help: &str) -> Histogram {
    let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
    register(registry, Histogram::with_opts(opts).unwrap_or_else(|e| panic!("metric {name}: {e}")))
}

fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    // Names are fixed at compile time and unique: a failure here is a programming error.
    #[allow(clippy::expect_used)]
    registry.register(Box::new(metric.clone())).expect("metric names are unique");
    metric
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry holding the whole catalogue.
    #[allow(clippy::expect_used)]
    pub fn new() -> Self {
        let r = Registry::new();
        let connections =
            register(&r, IntGauge::new("chat_connections", "Open WebSocket connections.").expect("valid metric"));
        let batch_opts = HistogramOpts::new("chat_fanout_batch_size", "Sends per fanout batch.")
            .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0]);
        let bus_opts = HistogramOpts::new("chat_bus_seconds", "Bus operation latency in seconds.")
            .buckets(LATENCY_BUCKETS.to_vec());
        let depth_opts =
            HistogramOpts::new("chat_outbound_queue_depth", "Frames queued for a connection when its writer wakes.")
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 64.0, 256.0, 1024.0]);
        let store_opts = HistogramOpts::new("chat_store_seconds", "Store operation latency in seconds.")
            .buckets(LATENCY_BUCKETS.to_vec());
        Self {
            connections,
            connections_total: counter(&r, "chat_connections_total", "WebSocket connections accepted."),
            disconnects: counter_vec(
                &r,
                "chat_disconnects_total",
                "Connections refused or closed by the server, by reason.",
                &["reason"],
            ),
            frames_received: counter_vec(
                &r,
                "chat_frames_received_total",
                "Client frames received, by type.",
                &["type"],
            ),
            errors_sent: counter_vec(&r, "chat_errors_sent_total", "Error frames sent, by code.", &["code"]),
            joins: counter(&r, "chat_joins_total", "Successful joins."),
            sends: counter_vec(&r, "chat_sends_total", "Sends by outcome.", &["outcome"]),
            deliveries: counter(&r, "chat_deliveries_total", "Message frames written to connections."),
            drops: counter_vec(&r, "chat_drops_total", "Frames or deliveries not delivered, by reason.", &["reason"]),
            gap_repairs: counter(&r, "chat_gap_repairs_total", "Gaps in a room feed filled from the store."),
            gap_repaired_messages: counter(&r, "chat_gap_repaired_messages_total", "Messages recovered by gap repair."),
            send_to_ack: histogram(&r, "chat_send_ack_seconds", "Gateway receive of a send to its ack, in seconds."),
            sequence_to_gateway: histogram(
                &r,
                "chat_sequence_to_gateway_seconds",
                "Sequencing to gateway fan-out, in seconds.",
            ),
            sequenced: counter(&r, "chat_sequenced_total", "Messages sequenced and stored."),
            store_latency: register(&r, HistogramVec::new(store_opts, &["op"]).expect("valid metric")),
            store_errors: counter_vec(&r, "chat_store_errors_total", "Store errors, by operation.", &["op"]),
            seq_conflicts: counter(&r, "chat_seq_conflicts_total", "Sequencing conflicts with another writer."),
            send_redeliveries: counter(
                &r,
                "chat_send_redeliveries_total",
                "Sends handed to a worker again by JetStream (ack deadline passed, or a worker died).",
            ),
            fanout_batch: register(&r, Histogram::with_opts(batch_opts).expect("valid metric")),
            history_coalesced: counter(
                &r,
                "chat_history_coalesced_total",
                "History reads that joined an identical read in flight.",
            ),
            history_cache_hits: counter(
                &r,
                "chat_history_cache_hits_total",
                "Replays and gap fills served from recent messages in memory.",
            ),
            faults_injected: counter_vec(
                &r,
                "chat_faults_injected_total",
                "Faults injected, by hop and action.",
                &["hop", "action"],
            ),
            bus_latency: register(&r, HistogramVec::new(bus_opts, &["op"]).expect("valid metric")),
            outbound_queue_depth: register(&r, Histogram::with_opts(depth_opts).expect("valid metric")),
            delivery_lag: histogram(
                &r,
                "chat_delivery_lag_seconds",
                "Age of the oldest message of each connection write batch, in seconds.",
            ),
            registry: r,
        }
    }

    /// Counts an injected fault; a `drop` also counts as a drop with reason `fault_drop`.
    pub fn fault(&self, hop: &str, action: &str) {
        self.faults_injected.with_label_values(&[hop, action]).inc();
        if action == "drop" {
            self.drops.with_label_values(&["fault_drop"]).inc();
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            return format!("# encoding failed: {e}\n");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}
