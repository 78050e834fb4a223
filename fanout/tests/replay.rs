//! Decision logs and their replay: a worker on a real embedded store, racing another worker on
//! a room (a conflict) and handed a redelivered send, writes a decision log; the replay of that
//! log decides exactly the same. A log edited to answer differently replays to a divergence
//! that names the decision, and a log that lost records or was cut short is refused.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test harness: a failed set-up step should panic

use std::sync::Arc;

use async_trait::async_trait;
use bus::{BusError, FanoutBus, PendingSend, Replier};
use fanout::decision_log::{Decided, DecisionHook, DecisionKind, DecisionLog, Record, StoreAnswer, StoreCall};
use fanout::replay::{replay, Log, LogError};
use fanout::{Fanout, FanoutConfig};
use protocol::bus::{SendCommand, SendOutcome};
use protocol::ChatMessage;
use storage::embedded::EmbeddedStore;
use storage::HistoryStore;
use telemetry::journal::Journal;
use telemetry::metrics::Metrics;
use tokio::sync::{mpsc, oneshot};

/// Hands out the batches a test pushes.
struct ScriptedBus(tokio::sync::Mutex<mpsc::UnboundedReceiver<Vec<PendingSend>>>);

#[async_trait]
impl FanoutBus for ScriptedBus {
    async fn next_batch(&self, _max: usize) -> Option<Vec<PendingSend>> {
        self.0.lock().await.recv().await
    }

    async fn deliver(&self, _message: Arc<ChatMessage>, _traceparent: &str) -> Result<(), BusError> {
        Ok(())
    }
}

struct Answer(oneshot::Sender<Result<SendOutcome, BusError>>);

#[async_trait]
impl Replier for Answer {
    async fn reply(self: Box<Self>, outcome: Result<SendOutcome, BusError>) {
        let _ = self.0.send(outcome);
    }
}

struct Worker {
    batches: mpsc::UnboundedSender<Vec<PendingSend>>,
    task: tokio::task::JoinHandle<()>,
}

fn worker(store: Arc<dyn HistoryStore>, log: Option<&DecisionLog>) -> Worker {
    let (batches, receiver) = mpsc::unbounded_channel();
    let bus = Arc::new(ScriptedBus(tokio::sync::Mutex::new(receiver)));
    let mut fanout = Fanout::new(store, bus, Arc::new(Journal::new("w", 100)), Metrics::new(), FanoutConfig::default());
    if let Some(log) = log {
        fanout = fanout.with_decision_log(log);
    }
    Worker { batches, task: tokio::spawn(fanout.run(std::future::pending())) }
}

impl Worker {
    /// Hands the worker one batch of `(command, delivery)` and waits for every answer.
    async fn batch(&self, sends: Vec<(SendCommand, u64)>) -> Vec<Result<SendOutcome, BusError>> {
        let (pending, answers): (Vec<_>, Vec<_>) = sends
            .into_iter()
            .map(|(command, delivery)| {
                let (tx, rx) = oneshot::channel();
                (PendingSend { command, delivery, reply: Box::new(Answer(tx)) }, rx)
            })
            .unzip();
        self.batches.send(pending).unwrap();
        let mut outcomes = Vec::new();
        for answer in answers {
            outcomes.push(answer.await.expect("every send is answered"));
        }
        outcomes
    }

    async fn stop(self) {
        drop(self.batches);
        self.task.await.unwrap();
    }
}

fn send(room: &str, user: &str, client_msg_id: &str, deadline_ms: i64) -> SendCommand {
    SendCommand {
        room: room.into(),
        user: user.into(),
        client_msg_id: client_msg_id.into(),
        body: format!("the body of {client_msg_id}, whose length alone is logged"),
        traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
        gateway: "gw-1".into(),
        deadline_ms,
    }
}

fn soon() -> i64 {
    protocol::now_ms() + 5_000
}

/// Runs a logged worker through a conflict with another worker and a redelivery; returns the
/// log's text.
async fn a_real_run(dir: &std::path::Path) -> String {
    let store: Arc<dyn HistoryStore> = Arc::new(EmbeddedStore::open(&dir.join("store")).unwrap());
    let path = dir.join("decisions.jsonl");
    let (log, writer) = DecisionLog::create(&path, "fanout-a", &FanoutConfig::default(), 1024).await.unwrap();
    let a = worker(store.clone(), Some(&log));
    let b = worker(store.clone(), None);
    // The bus says which partitions worker a pulls (bus::nats does, through the chat binary).
    log.ownership(&[0, 1, 2]);

    // Batch 1: two rooms, a rejection and an expired send.
    let first = a
        .batch(vec![
            (send("r1", "alice", "c1", soon()), 1),
            (send("r1", "alice", "c2", soon()), 1),
            (send("r2", "bob", "c1", 0), 1),
            (send("r2", "bad user!", "c9", soon()), 1),
            (send("r2", "bob", "late", 1), 1),
        ])
        .await;
    assert_eq!(first[1].as_ref().unwrap().message.seq, 2);
    // The other worker takes r1's seq 3, so worker a's cached last seq (2) is stale ...
    let other = b.batch(vec![(send("r1", "carol", "b1", soon()), 1)]).await;
    assert_eq!(other[0].as_ref().unwrap().message.seq, 3);
    // ... and its append conflicts, then succeeds with seq 4 (batch 2).
    let raced = a.batch(vec![(send("r1", "alice", "c3", soon()), 1)]).await;
    assert_eq!(raced[0].as_ref().unwrap().message.seq, 4);
    log.ownership(&[0, 1]);
    // Batch 3: c2 comes back (a redelivery after a stall), plus a new send.
    let again = a.batch(vec![(send("r1", "alice", "c2", soon()), 2), (send("r2", "bob", "c2", soon()), 1)]).await;
    let repeat = again[0].as_ref().unwrap();
    assert!(repeat.duplicate && repeat.message.seq == 2, "{repeat:?}");

    a.stop().await;
    b.stop().await;
    let summary = writer.close().await.unwrap();
    assert_eq!(summary.lost, 0);
    std::fs::read_to_string(&path).unwrap()
}

fn kinds(decisions: &[(u64, Decided)]) -> Vec<(u64, String, &DecisionKind)> {
    decisions.iter().map(|(b, d)| (*b, d.client_msg_id.clone(), &d.decision)).collect()
}

#[tokio::test]
async fn a_real_runs_log_with_a_conflict_and_a_redelivery_replays_to_identical_decisions() {
    let dir = tempfile::tempdir().unwrap();
    let text = a_real_run(dir.path()).await;
    let log = Log::parse(&text).unwrap();
    assert_eq!(log.batches.len(), 3);
    assert!(log.batches[2].iter().any(|s| s.client_msg_id == "c2" && s.delivery == 2), "the redelivery is logged");
    assert!(!text.contains("whose length alone"), "bodies are not logged");

    let report = replay(&log).await;
    let rendered = report.render(true);
    assert!(report.identical(), "{rendered}");
    assert_eq!(kinds(&report.replayed).len(), kinds(&report.logged).len());

    // Everything that happened is among the decisions, the conflict and the redelivery too.
    let logged = kinds(&report.logged);
    let has = |batch: u64, id: &str, want: &dyn Fn(&DecisionKind) -> bool| {
        logged.iter().any(|(b, c, k)| *b == batch && c == id && want(k))
    };
    assert!(has(1, "c1", &|k| matches!(k, DecisionKind::New { seq: 1, .. })), "{rendered}");
    assert!(has(1, "c9", &|k| matches!(k, DecisionKind::Rejected { .. })), "{rendered}");
    assert!(has(1, "late", &|k| matches!(k, DecisionKind::Expired)), "{rendered}");
    assert!(has(2, "c3", &|k| matches!(k, DecisionKind::ConflictRetry { attempt: 0 })), "{rendered}");
    assert!(has(2, "c3", &|k| matches!(k, DecisionKind::New { seq: 4, .. })), "{rendered}");
    assert!(has(3, "c2", &|k| matches!(k, DecisionKind::Duplicate { seq: 2, .. })), "{rendered}");
    assert!(rendered.contains("batch 3: 2 sends, 1 redelivered"), "{rendered}");
    assert!(rendered.contains("room r1 alice/c3: conflict on attempt 0; sequencing again"), "{rendered}");
    assert!(rendered.contains("identical: 9 decisions replayed as logged"), "{rendered}");
    // Ownership changes are told where they happened.
    let at = |text: &str| rendered.find(text).unwrap_or_else(|| panic!("{text} in {rendered}"));
    assert!(at("partitions taken: 0 1 2") < at("batch 1:"), "{rendered}");
    assert!(at("batch 2:") < at("partitions released: 2") && at("partitions released: 2") < at("batch 3:"));
}

#[tokio::test]
async fn a_changed_store_answer_is_reported_as_a_divergence_naming_the_decision() {
    let dir = tempfile::tempdir().unwrap();
    let text = a_real_run(dir.path()).await;
    // After the conflict, the store told worker a that r1's last seq was 3 (and, reading the
    // head of the room's chain, gave it seq 3): say 7 instead.
    let mut changed = 0;
    let edited: Vec<String> = text
        .lines()
        .map(|line| {
            let mut record: Record = serde_json::from_str(line).unwrap();
            if let Record::Store { batch: 2, room, call, answer } = &mut record {
                match (call, answer) {
                    (StoreCall::LastSeq, answer) if room == "r1" && *answer == StoreAnswer::LastSeq(3) => {
                        *answer = StoreAnswer::LastSeq(7);
                        changed += 1;
                    }
                    (StoreCall::Page { .. }, StoreAnswer::Page { messages, .. }) if room == "r1" => {
                        for m in messages.iter_mut().filter(|m| m.seq == 3) {
                            m.seq = 7;
                            changed += 1;
                        }
                    }
                    _ => {}
                }
            }
            serde_json::to_string(&record).unwrap()
        })
        .collect();
    assert_eq!(changed, 2, "the log holds the re-read after the conflict:\n{text}");

    let report = replay(&Log::parse(&edited.join("\n")).unwrap()).await;
    assert!(!report.identical());
    let divergence = report.divergence.as_ref().expect("a divergent decision");
    assert_eq!((divergence.batch, divergence.room.as_str(), divergence.client_msg_id.as_str()), (2, "r1", "c3"));
    assert!(matches!(divergence.logged.as_ref().unwrap().decision, DecisionKind::New { seq: 4, .. }));
    assert!(matches!(divergence.replayed.as_ref().unwrap().decision, DecisionKind::New { seq: 8, .. }));
    let rendered = report.render(false);
    assert!(rendered.contains("DIVERGED at batch 2, room r1, client_msg_id c3"), "{rendered}");
    // The append that followed asked the store something else than the log holds.
    assert!(
        report.mismatches.iter().any(|m| m.contains("append 1 messages (seqs 8..=8) after last seq 7")),
        "{:?}",
        report.mismatches
    );
}

#[tokio::test]
async fn a_log_that_lost_records_or_was_cut_short_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let text = a_real_run(dir.path()).await;
    let lines: Vec<&str> = text.lines().collect();

    let cut = lines[..lines.len() - 1].join("\n");
    assert!(matches!(Log::parse(&cut), Err(LogError::Incomplete(_))));

    let mut lossy = lines.clone();
    lossy.insert(3, r#"{"event":"lost","records":2}"#);
    let refused = Log::parse(&lossy.join("\n")).unwrap_err();
    assert!(refused.to_string().starts_with("log incomplete: "), "{refused}");

    assert!(matches!(Log::parse("{\"event\":\"start\""), Err(LogError::Unreadable { line: 1, .. })));
}

/// A writer that falls behind drops records rather than holding the worker up, and says so in
/// the file.
#[tokio::test]
async fn a_full_channel_drops_and_counts_records_and_the_log_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("decisions.jsonl");
    let (log, writer) = DecisionLog::create(&path, "fanout-a", &FanoutConfig::default(), 1).await.unwrap();
    // On this single-threaded runtime the writer cannot run until the test yields.
    for i in 0..5 {
        log.decided(Decided {
            room: "r1".into(),
            user: "alice".into(),
            client_msg_id: format!("c{i}"),
            decision: DecisionKind::Expired,
        });
    }
    assert_eq!(log.lost(), 4);
    let summary = writer.close().await.unwrap();
    assert_eq!(summary.lost, 4);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(r#"{"event":"lost","records":4}"#), "{text}");
    assert!(matches!(Log::parse(&text), Err(LogError::Incomplete(_))));
}
