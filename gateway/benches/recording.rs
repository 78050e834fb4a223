//! What recording costs per frame: formatting a delivered message's line in the connection's
//! buffer and handing a write batch (128 frames) to the writer thread, which writes it to a file.
//! docs/benchmarks.md turns the result into a share of the server's CPU.
//!
//!   cargo bench -p gateway --bench recording
#![allow(clippy::expect_used)] // a benchmark that cannot set up has nothing to measure

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gateway::recorder::{ConnectionRecording, RecordConfig, Recorder};
use protocol::ChatMessage;
use uuid::Uuid;

fn message(seq: u64) -> ChatMessage {
    ChatMessage {
        room: "room-0042".into(),
        seq,
        id: Uuid::now_v7(),
        user: "user-0007".into(),
        body: "x".repeat(64),
        ts: 1_796_000_000_000,
        client_msg_id: format!("c-{seq}"),
        trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
    }
}

fn recording(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = RecordConfig {
        dir: dir.path().to_owned(),
        enabled: true,
        bodies: false,
        max_file_bytes: 64 << 20,
        max_total_bytes: 256 << 20,
    };
    let recorder: Arc<Recorder> = Recorder::start(config, "bench").expect("recorder");
    let mut connection = ConnectionRecording::new(recorder.clone(), 1);
    let messages: Vec<ChatMessage> = (1..=128).map(message).collect();

    let mut group = c.benchmark_group("recording");
    group.throughput(Throughput::Elements(128));
    group.bench_function("128 delivered messages, one write batch", |b| {
        b.iter(|| {
            for m in &messages {
                connection.message(m, 180);
            }
            connection.flush();
        })
    });
    group.finish();
    let status = recorder.status();
    eprintln!("recorder: {} lines written, {} dropped (the writer fell behind)", status.written, status.dropped);
}

criterion_group!(benches, recording);
criterion_main!(benches);
