//! `loadgen capacity`: `measure` against the in-process server writes a model with positive
//! costs, and `plan` (the binary) reads it. No timing is asserted: the machine is shared.

use std::time::Duration;

use loadgen::capacity::measure::{measure, MeasureOptions};
use loadgen::capacity::model::{Limits, Model, Throughput};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measure_writes_a_model_that_plan_reads() {
    let server = server(None).await;
    let options = MeasureOptions {
        url: server.ws_url.clone(),
        // The server runs in this process, so its CPU includes loadgen's own.
        pids: vec![std::process::id()],
        kind: "all-in-one".into(),
        idle_connections: 30,
        clients: 10,
        small_room: 2,
        large_room: 10,
        small_rates: vec![20.0, 40.0],
        large_rates: vec![10.0, 20.0],
        step: Duration::from_secs(1),
        ramp: 0.0,
        // This machine is shared: keep every step in the fit whatever its latency.
        saturated_p99_ms: f64::INFINITY,
        nats: Throughput { per_sec: 0.0, source: "not measured".into() },
        store: Throughput { per_sec: 685.0, source: "test".into() },
        cluster_factor: (2.0, "test".into()),
        limits: Limits::default(),
        verbose: true,
    };
    let model = tokio::time::timeout(LIMIT, measure(&options)).await.expect("measure timed out").unwrap();
    let names: Vec<&str> = model.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["quiet", "idle", "small-rooms", "small-rooms", "large-rooms", "large-rooms"]);
    assert!(model.steps.iter().all(|s| s.passed), "{:?}", model.steps);
    assert!(model.server.in_process);
    assert!(model.machine.cores >= 1 && !model.machine.cpu_model.is_empty());
    let c = &model.cpu;
    assert!(c.seconds_per_send >= 0.0 && c.seconds_per_delivery >= 0.0, "{c:?}");
    assert!(c.seconds_per_send + c.seconds_per_delivery > 0.0, "{c:?}");
    assert!(
        model.steps[2].deliveries_per_sec > 0.0
            && model.steps[5].deliveries_per_sec > model.steps[3].deliveries_per_sec
    );

    let dir = tempdir();
    let path = dir.path().join("model.toml");
    model.write(&path).unwrap();
    assert_eq!(Model::read(&path).unwrap(), model);
    let p = path.display().to_string();
    let args =
        ["capacity", "plan", "--model", &p, "--users", "20000", "--sends-per-sec", "500", "--room-size", "zipf:200"];
    assert_eq!(loadgen_bin(args.iter().map(|s| s.to_string()).collect()).await, 0);
    let args = ["capacity", "knee", "--model", &p, "--clients", "1000", "--room-size", "100"];
    assert_eq!(loadgen_bin(args.iter().map(|s| s.to_string()).collect()).await, 0);
    let args = [
        "capacity",
        "plan",
        "--model",
        "/nonexistent/model.toml",
        "--users",
        "1",
        "--sends-per-sec",
        "1",
        "--room-size",
        "2",
    ];
    assert_eq!(loadgen_bin(args.iter().map(|s| s.to_string()).collect()).await, 64);
}
