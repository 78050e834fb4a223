//! What recording costs per frame: formatting a delivered message's line in the connection's
//! buffer and handing a write batch (128 frames) to the writer thread, which writes it to a file.
//! The second benchmark reports the whole process's CPU time (both threads, user and kernel: the
//! writer's copies into the page cache too) instead of wall time, paced so the writer never falls
//! behind. docs/benchmarks.md turns the results into a share of the server's CPU.
//!
//!   cargo bench -p gateway --bench recording
#![allow(clippy::expect_used)] // a benchmark that cannot set up has nothing to measure

use std::sync::Arc;
use std::time::Duration;

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
        prev: None,
        digest: None,
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
    group.bench_function("128 delivered messages, process CPU incl. writer thread and kernel", |b| {
        b.iter_custom(|batches| {
            let start = process_cpu();
            let before = recorder.status();
            let mut handed = 0u64;
            for n in 0..batches {
                for m in &messages {
                    connection.message(m, 180);
                }
                connection.flush();
                handed += 128;
                // Pace like a server would: never more than 256 batches ahead of the writer.
                if n % 64 == 63 {
                    wait_for_writer(&recorder, before.written + before.dropped + handed.saturating_sub(256 * 128));
                }
            }
            wait_for_writer(&recorder, before.written + before.dropped + handed);
            process_cpu().saturating_sub(start)
        })
    });
    group.finish();
    let status = recorder.status();
    eprintln!("recorder: {} lines written, {} dropped (the writer fell behind)", status.written, status.dropped);
}

/// Sleeps (costing no CPU) until the writer has taken `lines` lines in all.
fn wait_for_writer(recorder: &Recorder, lines: u64) {
    loop {
        let status = recorder.status();
        if status.written + status.dropped >= lines {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// CPU time of the whole process, every thread, user and kernel: the sum of the threads'
/// scheduler run times (`/proc/self/task/*/schedstat`, nanoseconds).
fn process_cpu() -> Duration {
    let tasks = std::fs::read_dir("/proc/self/task").expect("/proc/self/task (Linux)");
    let nanos: u64 = tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(nanos)
}

criterion_group!(benches, recording);
criterion_main!(benches);
