//! The metric catalogue (documented in docs/metrics.md), exposed in the OpenMetrics text format
//! by [prometheus-client](https://docs.rs/prometheus-client). Every label has a small, fixed set
//! of values, so cardinality stays bounded whatever clients send. The two end-to-end latency
//! histograms carry exemplars: the trace id of a message that landed in each bucket, so a
//! dashboard can jump from a slow bucket to that message's trace.

use std::sync::atomic::AtomicU64;
use std::time::SystemTime;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Latency buckets in seconds, 100 µs to 10 s.
const LATENCY_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// Buckets in seconds for the time to a send's answer, finer around its 5 s deadline: the
/// share at or below `5` is the share answered within it.
const ANSWER_BUCKETS: &[f64] = &[0.01, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 11.0, 15.0];

/// An integer counter.
pub type IntCounter = Counter<u64, AtomicU64>;

/// An integer gauge.
pub type IntGauge = Gauge;

/// The label set of an exemplar: the W3C trace id of the message observed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TraceExemplar {
    /// 32 lowercase hex digits.
    pub trace_id: String,
}

/// A latency histogram whose buckets remember the trace id of their latest observation.
#[derive(Clone, Debug)]
pub struct TracedHistogram(HistogramWithExemplars<TraceExemplar>);

impl TracedHistogram {
    fn new() -> Self {
        Self(HistogramWithExemplars::new(LATENCY_BUCKETS.iter().copied()))
    }

    /// Observes `seconds` for the message traced by `trace_id` (its exemplar when not empty).
    pub fn observe(&self, seconds: f64, trace_id: &str) {
        let exemplar = (!trace_id.is_empty()).then(|| TraceExemplar { trace_id: trace_id.to_owned() });
        self.0.observe(seconds, exemplar, Some(SystemTime::now()));
    }
}

/// Label values in the order of their family's label names.
type LabelValues = Vec<(&'static str, String)>;

/// Builds a family's histograms with its buckets.
#[derive(Clone, Debug)]
pub struct Buckets(&'static [f64]);

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(self.0.iter().copied())
    }
}

/// A family of metrics told apart by fixed label names, looked up by their values.
#[derive(Clone, Debug)]
pub struct Labelled<M, C = fn() -> M> {
    names: &'static [&'static str],
    family: Family<LabelValues, M, C>,
}

impl<M: Clone, C: MetricConstructor<M>> Labelled<M, C> {
    /// The metric for these label values (as many as the family has names, in order).
    pub fn with_label_values(&self, values: &[&str]) -> M {
        debug_assert_eq!(values.len(), self.names.len(), "label values for {:?}", self.names);
        let key = self.names.iter().zip(values).map(|(name, value)| (*name, (*value).to_owned())).collect();
        self.family.get_or_create_owned(&key)
    }
}

/// A family of counters.
pub type CounterVec = Labelled<IntCounter>;

/// A family of histograms sharing one set of buckets.
pub type HistogramVec = Labelled<Histogram, Buckets>;

/// Every metric this system exports, registered in one registry per process.
#[derive(Clone)]
pub struct Metrics {
    registry: std::sync::Arc<Registry>,
    /// Open WebSocket connections.
    pub connections: IntGauge,
    /// WebSocket connections accepted.
    pub connections_total: IntCounter,
    /// Connections refused or closed by the server, by reason.
    pub disconnects: CounterVec,
    /// Client frames received, by frame type (`invalid` for unparseable ones).
    pub frames_received: CounterVec,
    /// `error` frames sent, by code.
    pub errors_sent: CounterVec,
    /// Successful joins.
    pub joins: IntCounter,
    /// Sends by outcome: `acked`, `duplicate`, `unavailable`, `rejected`.
    pub sends: CounterVec,
    /// Sends this gateway has handed on and not yet answered (capped by `--max-sends-in-flight`).
    pub sends_in_flight: IntGauge,
    /// The limit in force on admitted sends still within their deadline: the cap, or what the
    /// workers' recent stored rate clears in a third of a send's deadline if lower
    /// (gateway/src/admission.rs).
    pub send_admission_limit: IntGauge,
    /// `message` frames written to connections.
    pub deliveries: IntCounter,
    /// Deliveries or frames not delivered, by reason.
    pub drops: CounterVec,
    /// Gaps in a room's feed filled from the store.
    pub gap_repairs: IntCounter,
    /// Messages recovered by gap repair.
    pub gap_repaired_messages: IntCounter,
    /// Time from a gateway receiving a `send` to sending its `ack` (exemplars: trace ids).
    pub send_to_ack: TracedHistogram,
    /// Time from a gateway receiving an admitted `send` to having its answer, by outcome (as
    /// `chat_sends_total`: an ack, a duplicate's ack, or an error): the share within the send's
    /// deadline, and whether the late ones are acks or refusals.
    pub send_answer: HistogramVec,
    /// What the workers said about sends answered `internal` at their deadline, by `outcome`:
    /// `stored` (after all), `refused`, or `silent` (no word within 6 s).
    pub send_late_words: CounterVec,
    /// Time from sequencing to the gateway handing the message to its connections (exemplars:
    /// trace ids).
    pub sequence_to_gateway: TracedHistogram,
    /// Time from sequencing to the gateway taking in the worker's ack for it (cluster only;
    /// exemplars: trace ids). Beside `sequence_to_gateway` it shows whether answers lag deliveries.
    pub sequence_to_answer: TracedHistogram,
    /// Messages sequenced by fanout.
    pub sequenced: IntCounter,
    /// Store operation latency, by operation.
    pub store_latency: HistogramVec,
    /// Store errors, by operation.
    pub store_errors: CounterVec,
    /// Sequencing conflicts (another writer moved the room's seq first).
    pub seq_conflicts: IntCounter,
    /// Sends the bus handed to a worker again (held past the ack deadline, or a worker died).
    pub send_redeliveries: IntCounter,
    /// Copies of a send a gateway published again for a partition's new owner, because the
    /// worker that owned the partition when the send was published went silent or left.
    pub send_copies: IntCounter,
    /// Sends per fanout batch.
    pub fanout_batch: Histogram,
    /// Partitions of the send stream this worker pulls now (cluster only).
    pub partitions_owned: IntGauge,
    /// Fanout workers this worker counts as live now, itself included (cluster only).
    pub workers_live: IntGauge,
    /// 1 while this worker warms its store up (at start, and after the store came back from an
    /// outage), else 0 (cluster only).
    pub store_warming: IntGauge,
    /// History reads answered by joining an identical read already in flight.
    pub history_coalesced: IntCounter,
    /// Replays and gap fills answered from a room's recent messages in memory.
    pub history_cache_hits: IntCounter,
    /// Faults injected, by hop and action.
    pub faults_injected: CounterVec,
    /// Messages that failed a message-chain check, by `kind` (`altered`: the digest does not
    /// match the fields; `fork`: `prev` is not the digest of the seq before it as received) and
    /// `source` (`feed`: from the bus or gap repair; `deliver`: after this gateway's delivery
    /// stage; `history`: read from the store for a client).
    pub chain_violations: CounterVec,
    /// Bus operation latency, by operation.
    pub bus_latency: HistogramVec,
    /// Frames waiting in a connection's outbound queue when its writer wakes up.
    pub outbound_queue_depth: Histogram,
    /// Age of the oldest message of each write batch (now − `ts`): per-connection delivery lag.
    pub delivery_lag: Histogram,
}

/// Registers metrics into one registry. OpenMetrics names a counter's samples `<name>_total`,
/// so counters are registered without that suffix and exported with it.
struct Registrar(Registry);

impl Registrar {
    fn add<M: prometheus_client::registry::Metric + Clone>(&mut self, name: &str, help: &str, metric: M) -> M {
        self.0.register(name, help, metric.clone());
        metric
    }

    fn counter(&mut self, name: &str, help: &str) -> IntCounter {
        self.add(name, help, IntCounter::default())
    }

    fn counter_vec(&mut self, name: &str, help: &str, names: &'static [&'static str]) -> CounterVec {
        let family = self.add(name, help, Family::default());
        Labelled { names, family }
    }

    fn histogram(&mut self, name: &str, help: &str, buckets: &'static [f64]) -> Histogram {
        self.add(name, help, Histogram::new(buckets.iter().copied()))
    }

    fn histogram_vec(
        &mut self,
        name: &str,
        help: &str,
        names: &'static [&'static str],
        buckets: &'static [f64],
    ) -> HistogramVec {
        let family = self.add(name, help, Family::new_with_constructor(Buckets(buckets)));
        Labelled { names, family }
    }

    fn traced(&mut self, name: &str, help: &str) -> TracedHistogram {
        TracedHistogram(self.add(name, help, TracedHistogram::new().0))
    }
}

// Label values known in advance, exported as `0` from the start so that queries and alerts over
// them see a series before the first event (Prometheus's advice for labelled counters). Fault
// labels are left out on purpose: a fault series appears only once a fault fires.
const DISCONNECT_REASONS: &[&str] = &[
    "slow_consumer",
    "token_expired",
    "policy",
    "too_large",
    "draining",
    "protocol_error",
    "connection_limit",
    "socket_limit",
    "ip_connection_limit",
    "origin_refused",
    "other",
];
const FRAME_TYPES: &[&str] =
    &["hello", "join", "leave", "send", "history", "typing", "ping", "invalid", "binary", "too_large"];
const ERROR_CODES: &[&str] =
    &["bad_request", "unauthorized", "forbidden", "not_joined", "too_large", "rate_limited", "unavailable", "internal"];
const SEND_OUTCOMES: &[&str] = &["acked", "duplicate", "unavailable", "indeterminate", "rejected", "internal"];
const DROP_REASONS: &[&str] = &[
    "queue_full",
    "resynced_from_store",
    "ephemeral_queue_full",
    "typing_unpublished",
    "rate_limited",
    "feed_duplicate",
    "unverified_seq",
    "overloaded",
];
const STORE_OPS: &[&str] = &["append", "last_seq", "find_dedupe", "page", "get_by_id"];
const LATE_WORDS: &[&str] = &["stored", "refused", "silent"];
/// Kinds and sources of chain violations (every pair is exported as 0).
pub const CHAIN_KINDS: &[&str] = &["altered", "fork"];
/// Where a gateway found a chain violation.
pub const CHAIN_SOURCES: &[&str] = &["feed", "deliver", "history"];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry holding the whole catalogue.
    pub fn new() -> Self {
        let metrics = Self::unset();
        let known = [
            (&metrics.disconnects, DISCONNECT_REASONS),
            (&metrics.frames_received, FRAME_TYPES),
            (&metrics.errors_sent, ERROR_CODES),
            (&metrics.sends, SEND_OUTCOMES),
            (&metrics.drops, DROP_REASONS),
            (&metrics.store_errors, STORE_OPS),
            (&metrics.send_late_words, LATE_WORDS),
        ];
        for (family, values) in known {
            for value in values {
                family.with_label_values(&[value]);
            }
        }
        for outcome in SEND_OUTCOMES {
            metrics.send_answer.with_label_values(&[outcome]);
        }
        for kind in CHAIN_KINDS {
            for source in CHAIN_SOURCES {
                metrics.chain_violations.with_label_values(&[kind, source]);
            }
        }
        metrics
    }

    fn unset() -> Self {
        let mut r = Registrar(Registry::default());
        Self {
            connections: r.add("chat_connections", "Open WebSocket connections.", IntGauge::default()),
            connections_total: r.counter("chat_connections_accepted", "WebSocket connections accepted."),
            disconnects: r.counter_vec(
                "chat_disconnects",
                "Connections refused or closed by the server, by reason.",
                &["reason"],
            ),
            frames_received: r.counter_vec("chat_frames_received", "Client frames received, by type.", &["type"]),
            errors_sent: r.counter_vec("chat_errors_sent", "Error frames sent, by code.", &["code"]),
            joins: r.counter("chat_joins", "Successful joins."),
            sends: r.counter_vec("chat_sends", "Sends by outcome.", &["outcome"]),
            sends_in_flight: r.add(
                "chat_sends_in_flight",
                "Sends this gateway has handed on and not yet answered.",
                IntGauge::default(),
            ),
            send_admission_limit: r.add(
                "chat_send_admission_limit",
                "The limit in force on admitted sends still within their deadline: --max-sends-in-flight, or what the workers' recent stored rate clears in a third of a send's deadline if lower (never below 128).",
                IntGauge::default(),
            ),
            deliveries: r.counter("chat_deliveries", "Message frames written to connections."),
            drops: r.counter_vec("chat_drops", "Frames or deliveries not delivered, by reason.", &["reason"]),
            gap_repairs: r.counter("chat_gap_repairs", "Gaps in a room feed filled from the store."),
            gap_repaired_messages: r.counter("chat_gap_repaired_messages", "Messages recovered by gap repair."),
            send_to_ack: r.traced("chat_send_ack_seconds", "Gateway receive of a send to its ack, in seconds."),
            send_answer: r.histogram_vec(
                "chat_send_answer_seconds",
                "Gateway receive of an admitted send to its answer, by outcome (acked, duplicate, or an error), in seconds.",
                &["outcome"],
                ANSWER_BUCKETS,
            ),
            send_late_words: r.counter_vec(
                "chat_send_late_words",
                "What the workers said about sends answered `internal` (not known) at their deadline: stored, refused or silent.",
                &["outcome"],
            ),
            sequence_to_gateway: r
                .traced("chat_sequence_to_gateway_seconds", "Sequencing to gateway fan-out, in seconds."),
            sequence_to_answer: r.traced(
                "chat_sequence_to_answer_seconds",
                "Sequencing to the gateway taking in the worker's ack, in seconds.",
            ),
            sequenced: r.counter("chat_sequenced", "Messages sequenced and stored."),
            store_latency: r.histogram_vec(
                "chat_store_seconds",
                "Store operation latency in seconds.",
                &["op"],
                LATENCY_BUCKETS,
            ),
            store_errors: r.counter_vec("chat_store_errors", "Store errors, by operation.", &["op"]),
            seq_conflicts: r.counter("chat_seq_conflicts", "Sequencing conflicts with another writer."),
            send_redeliveries: r.counter(
                "chat_send_redeliveries",
                "Sends handed to a worker again by JetStream (ack deadline passed, or a worker died).",
            ),
            send_copies: r.counter(
                "chat_send_copies",
                "Sends published again by a gateway for a new owner, the worker holding them being gone.",
            ),
            fanout_batch: r.histogram(
                "chat_fanout_batch_size",
                "Sends per fanout batch.",
                &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
            ),
            partitions_owned: r.add(
                "chat_partitions_owned",
                "Partitions of the send stream this worker pulls.",
                IntGauge::default(),
            ),
            workers_live: r.add(
                "chat_workers_live",
                "Fanout workers this worker counts as live, itself included.",
                IntGauge::default(),
            ),
            store_warming: r.add(
                "chat_store_warming",
                "1 while this worker warms its store up (at start, after an outage).",
                IntGauge::default(),
            ),
            history_coalesced: r
                .counter("chat_history_coalesced", "History reads that joined an identical read in flight."),
            history_cache_hits: r
                .counter("chat_history_cache_hits", "Replays and gap fills served from recent messages in memory."),
            faults_injected: r.counter_vec(
                "chat_faults_injected",
                "Faults injected, by hop and action.",
                &["hop", "action"],
            ),
            chain_violations: r.counter_vec(
                "chat_chain_violations",
                "Messages that failed a message-chain check, by kind (altered, fork) and source (feed, deliver, history).",
                &["kind", "source"],
            ),
            bus_latency: r.histogram_vec(
                "chat_bus_seconds",
                "Bus operation latency in seconds.",
                &["op"],
                LATENCY_BUCKETS,
            ),
            outbound_queue_depth: r.histogram(
                "chat_outbound_queue_depth",
                "Frames queued for a connection when its writer wakes.",
                &[1.0, 2.0, 4.0, 8.0, 16.0, 64.0, 256.0, 1024.0],
            ),
            delivery_lag: r.histogram(
                "chat_delivery_lag_seconds",
                "Age of the oldest message of each connection write batch, in seconds.",
                LATENCY_BUCKETS,
            ),
            registry: std::sync::Arc::new(r.0),
        }
    }

    /// Counts an injected fault; a `drop` also counts as a drop with reason `fault_drop`.
    pub fn fault(&self, hop: &str, action: &str) {
        self.faults_injected.with_label_values(&[hop, action]).inc();
        if action == "drop" {
            self.drops.with_label_values(&["fault_drop"]).inc();
        }
    }

    /// The OpenMetrics text exposition of every metric ([`CONTENT_TYPE`]), ending in `# EOF`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            return format!("# encoding failed: {e}\n# EOF\n");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_exported_with_the_total_suffix_and_their_labels() {
        let metrics = Metrics::new();
        metrics.sends.with_label_values(&["acked"]).inc();
        metrics.connections_total.inc();
        metrics.connections.set(3);
        let text = metrics.render();
        assert!(text.contains("chat_sends_total{outcome=\"acked\"} 1\n"), "{text}");
        assert!(text.contains("chat_connections_accepted_total 1\n"), "{text}");
        assert!(text.contains("chat_connections 3\n"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn latency_buckets_carry_the_trace_id_of_their_latest_message() {
        let metrics = Metrics::new();
        metrics.send_to_ack.observe(0.003, "0af7651916cd43dd8448eb211c80319c");
        metrics.send_to_ack.observe(0.004, "");
        let text = metrics.render();
        let bucket = text
            .lines()
            .find(|l| l.starts_with("chat_send_ack_seconds_bucket{le=\"0.005\"}"))
            .unwrap_or_else(|| panic!("{text}"));
        assert!(
            bucket.starts_with(
                "chat_send_ack_seconds_bucket{le=\"0.005\"} 2 # {trace_id=\"0af7651916cd43dd8448eb211c80319c\"} 0.003"
            ),
            "{bucket}"
        );
        assert!(text.contains("chat_send_ack_seconds_count 2\n"), "{text}");
    }

    #[test]
    fn known_label_values_are_exported_as_zero_but_faults_are_not() {
        let text = Metrics::new().render();
        assert!(text.contains("chat_drops_total{reason=\"queue_full\"} 0\n"), "{text}");
        assert!(text.contains("chat_chain_violations_total{kind=\"fork\",source=\"feed\"} 0\n"), "{text}");
        assert!(text.contains("chat_chain_violations_total{kind=\"altered\",source=\"deliver\"} 0\n"), "{text}");
        assert!(text.contains("chat_store_errors_total{op=\"append\"} 0\n"), "{text}");
        assert!(text.contains("chat_sends_total{outcome=\"unavailable\"} 0\n"), "{text}");
        assert!(!text.contains("fault_drop") && !text.contains("chat_faults_injected_total{"), "{text}");
    }

    #[test]
    fn a_labelled_family_keeps_one_series_per_value() {
        let metrics = Metrics::new();
        metrics.store_latency.with_label_values(&["append"]).observe(0.002);
        metrics.store_latency.with_label_values(&["append"]).observe(0.002);
        metrics.fault("fanout.sequence", "drop");
        let text = metrics.render();
        assert!(text.contains("chat_store_seconds_count{op=\"append\"} 2\n"), "{text}");
        assert!(text.contains("chat_faults_injected_total{hop=\"fanout.sequence\",action=\"drop\"} 1\n"), "{text}");
        assert!(text.contains("chat_drops_total{reason=\"fault_drop\"} 1\n"), "{text}");
    }
}
