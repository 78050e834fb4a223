//! `loadgen compare` on real runs against one all-in-one server: two runs of the same build
//! show no significant difference (exit 0); a run with a 2 ms delay planted at `fanout.publish`
//! is a regression, named at the hop pair that spans the publish (exit 1).
//!
//! The gate is set for a shared 2-core machine: `--threshold 100 --floor-ms 1.5`, a median must
//! double and grow by 1.5 ms to fail. The defaults (10%, 0.5 ms) are for a quiet machine; here,
//! medians of send→delivery measured 4.2 to 6.9 ms in identical runs minutes apart as other
//! work came and went. The delay (2 ms, served as about 3 ms by tokio's millisecond timer) is
//! 100 times its hop's usual 20-30 µs, so it fails the gate by a wide margin.
//!
//! (Running the two same-build runs at the same time does not help: both schedules send at the
//! same instants, so whichever run starts a millisecond earlier always has its messages first in
//! the worker's batch, and the other is systematically slower.)

use std::path::{Path, PathBuf};
use std::time::Duration;

use chat::testing::RunningServer;

use crate::support::*;

/// A short run (12 clients in 2 rooms, 40 sends/s for 3 s, the same seed every time) with
/// journeys read, written to `dir/NAME.json`.
async fn run_to(server: &RunningServer, dir: &Path, name: &str) -> PathBuf {
    let mut cfg = config(server, name);
    cfg.phases[0].duration = Duration::from_secs(3);
    cfg.admin_token = Some(ADMIN.into());
    let report = run(cfg).await;
    assert!(report.passed, "{}", report.summary());
    let hops = &report.samples.hops;
    assert!(hops.error.is_none() && hops.read >= 100, "journeys read: {hops:?}");
    assert!(report.samples.latency_us["send_to_delivery"].values.len() >= 600);
    let path = dir.join(format!("{name}.json"));
    report.write_json(&path).unwrap();
    path
}

fn args(list: &[&Path]) -> Vec<String> {
    list.iter().map(|p| p.display().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_passes_the_same_build_and_names_a_delayed_hop() {
    let server = server(None).await;
    let dir = tempdir();
    let compare = |x: &Path, y: &Path, more: &[&Path]| {
        let mut v = vec!["compare".to_string()];
        v.extend(args(&[x, y]));
        v.extend(args(more));
        v.extend(["--threshold", "100", "--floor-ms", "1.5"].map(String::from));
        v
    };
    // A first run warms the server up (store files, first rooms); it is not compared.
    run_to(&server, dir.path(), "cmpwarm").await;
    // Two runs of the same build, back to back. When the machine's other work changes between
    // them they differ for real (a median of 2.4 ms against 7.6 ms was seen here once); a
    // fresh pair is tried then, up to three, each failure printed. A comparison that flags
    // identical builds as a rule fails all three.
    let mut attempts = Vec::new();
    let a = loop {
        let n = attempts.len();
        let a = run_to(&server, dir.path(), &format!("cmpa{n}")).await;
        let b = run_to(&server, dir.path(), &format!("cmpb{n}")).await;
        let (code, same) = loadgen_bin_output(compare(&a, &b, &[])).await;
        eprintln!("{same}");
        if code == 0 {
            assert!(same.contains("no significant regression"), "{same}");
            break a;
        }
        assert_eq!(code, 1, "{same}");
        attempts.push(same);
        assert!(attempts.len() < 3, "three pairs of runs of the same build differed:\n{}", attempts.join("\n"));
    };
    let body = r#"{"hop":"fanout.publish","action":"delay","probability":1,"seed":1,"delay_ms":2}"#;
    let (status, text) = http(&server, "POST", "/admin/faults", Some(body)).await;
    assert_eq!(status, 201, "planting the delay: {text}");
    let c = run_to(&server, dir.path(), "cmpc").await;
    server.shutdown().await.unwrap();

    let html = dir.path().join("compare.html");
    let mut with_html = compare(&a, &c, &[]);
    with_html.extend(["--html".to_string(), html.display().to_string()]);
    let (code, slow) = loadgen_bin_output(with_html).await;
    eprintln!("{slow}");
    assert_eq!(code, 1, "a 2 ms delay at fanout.publish:\n{slow}");
    // The hop pair ending at the publish holds the delay; an end-to-end regression, when the
    // 2-4 ms it adds to a median of 4-7 ms passes the gate, names it among the hops where it
    // happened (on a busy machine another hop pair can regress by more, and is named first).
    assert!(slow.contains("REGRESSION store.append→fanout.publish p50"), "{slow}");
    for line in slow.lines().filter(|l| l.starts_with("REGRESSION send_to_")) {
        let (_, hops) = line.split_once("; at hop ").unwrap_or_else(|| panic!("no hop named: {line}"));
        assert!(hops.contains("store.append→fanout.publish ("), "{slow}");
    }
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.starts_with("<!doctype html>") && page.contains("<svg") && !page.contains("<script"));
    assert!(page.contains("store.append→fanout.publish"));

    // Usage errors and unreadable files exit 2.
    assert_eq!(loadgen_bin(compare(&a, &dir.path().join("missing.json"), &[])).await, 2);
    assert_eq!(loadgen_bin(vec!["compare".into(), a.display().to_string()]).await, 2);
}
