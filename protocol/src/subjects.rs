//! The NATS subject scheme (see docs/architecture.md).
//!
//! Room names never contain `.`, `*`, `>` or spaces, so they are safe as a subject token.

/// JetStream stream holding accepted sends until a fanout worker has stored them.
pub const SEND_STREAM: &str = "CHAT_SEND";

/// Partitions of the send stream. All of a room's sends land in one partition, and each
/// partition is consumed by one fanout worker at a time (see docs/architecture.md).
pub const PARTITIONS: u32 = 16;

/// The partition of a room: a stable hash of its name.
pub fn partition(room: &str) -> u32 {
    crc32fast::hash(room.as_bytes()) % PARTITIONS
}

/// Subject of accepted sends for a room (captured by [`SEND_STREAM`]).
pub fn send(room: &str) -> String {
    format!("chat.send.{}.{room}", partition(room))
}

/// Wildcard matching one partition's sends.
pub fn send_partition(partition: u32) -> String {
    format!("chat.send.{partition}.>")
}

/// Core NATS subject where fanout workers announce themselves every second; the live set
/// decides who owns which partition.
pub const WORKERS: &str = "chat.workers";

/// Core NATS subject where a fanout worker says it is leaving (stopped on purpose), so the
/// others take its partitions at once instead of after its heartbeats fall silent.
pub const WORKERS_LEFT: &str = "chat.workers.left";

/// Core NATS subject on which fanout worker `worker` answers probes while it runs, so its peers
/// and the gateways can tell a worker that died (NATS answers "no responders") from one merely
/// quiet; `None` when the name is not a plain subject token (letters, digits, `-`, `_`).
pub fn worker_probe(worker: &str) -> Option<String> {
    let plain = !worker.is_empty() && worker.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    plain.then(|| format!("chat.workers.probe.{worker}"))
}

/// Wildcard matching every room's sends.
pub const SEND_ALL: &str = "chat.send.>";

/// The second token of [`deliver`] subjects.
pub const DELIVER_KIND: &str = "deliver";

/// The second token of [`events`] subjects.
pub const EVENTS_KIND: &str = "events";

/// Core NATS subject where fanout publishes a room's sequenced messages to gateways.
pub fn deliver(room: &str) -> String {
    format!("chat.{DELIVER_KIND}.{room}")
}

/// Wildcard a gateway follows a room with: [`deliver`] and [`events`] in one subscription. It
/// also matches any other `chat.<kind>.<room>` subject (`chat.journal.query` for a room called
/// `query`), so a follower looks at the kind.
pub fn room_feed(room: &str) -> String {
    format!("chat.*.{room}")
}

/// Core NATS subject where every process answers journey queries (payload: a message id)
/// with what its journey recorder holds.
pub const JOURNAL_QUERY: &str = "chat.journal.query";

/// Core NATS subject for a room's presence and typing events between gateways.
pub fn events(room: &str) -> String {
    format!("chat.{EVENTS_KIND}.{room}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_is_probed_on_a_subject_of_its_own_only_when_its_name_is_a_plain_token() {
        assert_eq!(worker_probe("fanout-1").as_deref(), Some("chat.workers.probe.fanout-1"));
        assert_eq!(worker_probe("fanout_0a1b").as_deref(), Some("chat.workers.probe.fanout_0a1b"));
        for odd in ["", "a.b", "a b", "*", ">", "fanout-*"] {
            assert_eq!(worker_probe(odd), None, "{odd:?}");
        }
    }
}
