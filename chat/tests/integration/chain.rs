//! The message chain catches lying processes: a gateway whose delivery stage rewrites a body
//! (`gateway.deliver` `rewrite`) and a worker that stores one message but publishes another
//! (`fanout.publish` `equivocate`) are each caught by the gateway (the chain-violation metric and a
//! `chain.violation` hop in the message's journey) and by the loadgen auditor (a finding naming
//! the message's id), on the in-process server with faults injected through `POST /admin/faults`.

use std::time::Duration;

use chat::testing::{RunningServer, TestServerOptions};
use loadgen::audit::{Finding, FindingKind};
use loadgen::schedule::Phase;
use loadgen::{Config, Report};
use serde_json::{json, Value};

use crate::support::*;

const TOKEN: &str = "chain-test-admin-token";

async fn server_with_faults() -> RunningServer {
    let mut options = TestServerOptions::default();
    options.gateway.admin_token = Some(TOKEN.into());
    server_with(options).await
}

/// Six members of one room, ten sends a second for two seconds, audited.
async fn audited_load(server: &RunningServer, prefix: &str) -> Report {
    let config = Config {
        urls: vec![server.ws_url.clone()],
        clients: 6,
        rooms: 1,
        rooms_per_client: 1,
        phases: vec![Phase { duration: Duration::from_secs(2), rate: 10.0 }],
        ramp: 0.0,
        history_rate: 0.0,
        seed: 7,
        drain: Duration::from_secs(3),
        prefix: prefix.into(),
        progress: false,
        ..Config::default()
    };
    tokio::time::timeout(Duration::from_secs(60), loadgen::run(config))
        .await
        .expect("loadgen finished in time")
        .expect("loadgen carried out")
}

fn findings(report: &Report, kind: FindingKind) -> Vec<&Finding> {
    report.audit.findings.iter().filter(|f| f.kind == kind).collect()
}

async fn journey(base: &str, id: &str) -> Value {
    let (status, journey) = get_json(&format!("{base}/debug/messages/{id}")).await;
    assert_eq!(status, 200, "journey of {id}: {journey}");
    journey
}

fn violations(journey: &Value) -> Vec<&Value> {
    journey["hops"].as_array().expect("hops").iter().filter(|hop| hop["hop"] == "chain.violation").collect()
}

async fn metric_value(base: &str, sample: &str) -> f64 {
    let (status, text) = get(&format!("{base}/metrics")).await;
    assert_eq!(status, 200);
    metric(&text, sample)
}

#[tokio::test]
async fn a_tampering_gateway_is_caught_by_its_own_check_and_by_the_auditor() {
    let server = server_with_faults().await;
    let base = server.http_url.clone();
    let zero = metric_value(&base, "chat_chain_violations_total{kind=\"altered\",source=\"deliver\"}").await;
    assert_eq!(zero, 0.0, "exported before the first violation");
    arm_fault(&base, TOKEN, &json!({"hop": "gateway.deliver", "action": "rewrite", "count": 1})).await;

    let report = audited_load(&server, "chrw").await;
    assert!(!report.passed, "an altered delivery fails the audit: {}", report.summary());
    let altered = findings(&report, FindingKind::ChainAltered);
    assert_eq!(altered.len(), 1, "{:#?}", report.audit.findings);
    assert_eq!(altered[0].count, 1, "one delivery was rewritten");
    assert_eq!(report.audit.counts.chain_altered, 1);
    assert!(findings(&report, FindingKind::Equivocation).is_empty(), "{:#?}", report.audit.findings);
    let id = altered[0].id.clone().expect("the finding names the message");

    // The gateway caught its own delivery stage: counted, and in the message's journey.
    let counted = metric_value(&base, "chat_chain_violations_total{kind=\"altered\",source=\"deliver\"}").await;
    assert_eq!(counted, 1.0);
    let journey = journey(&base, &id).await;
    let hops = violations(&journey);
    assert_eq!(hops.len(), 1, "{journey:#}");
    assert_eq!(hops[0]["detail"]["kind"], "altered");
    assert_eq!(hops[0]["detail"]["source"], "deliver");
    assert_eq!(hops[0]["detail"]["seq"], altered[0].seq.expect("seq"));
    assert_ne!(hops[0]["detail"]["expected"], hops[0]["detail"]["got"]);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_equivocating_worker_is_caught_by_the_gateway_and_by_the_auditor() {
    let server = server_with_faults().await;
    let base = server.http_url.clone();
    arm_fault(&base, TOKEN, &json!({"hop": "fanout.publish", "action": "equivocate", "count": 1})).await;

    let report = audited_load(&server, "cheq").await;
    assert!(!report.passed, "an equivocation fails the audit: {}", report.summary());
    let forks = findings(&report, FindingKind::Equivocation);
    assert_eq!(forks.len(), 1, "{:#?}", report.audit.findings);
    assert!(findings(&report, FindingKind::ChainAltered).is_empty(), "a competent liar passes the self-check");
    let forged_id = forks[0].id.clone().expect("the finding names the forged message");
    let seq = forks[0].seq.expect("seq");
    assert_eq!(forks[0].count, 6, "each of the six members got the next message, which revealed it");
    let history = whole_history(&base, &forks[0].room).await;
    let next = history.iter().find(|m| m["seq"] == seq + 1).expect("the message after the forged one");
    let next_id = next["id"].as_str().expect("id");
    assert!(forks[0].detail.contains(next_id), "{}", forks[0].detail);
    let stored = history.iter().find(|m| m["seq"] == seq).expect("the true message");
    assert_eq!(stored["id"], forged_id.as_str());
    assert!(!stored["body"].as_str().unwrap_or_default().contains("forged"), "history has the true one: {stored}");

    // The gateway found the fork at the next message, and names both in their journeys.
    assert_eq!(metric_value(&base, "chat_chain_violations_total{kind=\"fork\",source=\"feed\"}").await, 1.0);
    assert_eq!(metric_value(&base, "chat_chain_violations_total{kind=\"altered\",source=\"feed\"}").await, 0.0);
    let at_next = journey(&base, next_id).await;
    let hops = violations(&at_next);
    assert_eq!(hops.len(), 1, "{at_next:#}");
    assert_eq!(hops[0]["detail"]["kind"], "fork");
    assert_eq!(hops[0]["detail"]["source"], "feed");
    assert_eq!(hops[0]["detail"]["previous_id"], forged_id.as_str());
    assert_eq!(hops[0]["detail"]["got"], stored["digest"], "the next message chains to the stored one");
    assert!(hops[0]["detail"]["publisher"].is_string(), "the worker that published the forged one: {at_next:#}");
    let at_forged = journey(&base, &forged_id).await;
    assert_eq!(violations(&at_forged).len(), 1, "{at_forged:#}");
    assert!(
        at_forged["hops"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["hop"] == "fault.injected" && h["detail"]["action"] == "equivocate"),
        "{at_forged:#}"
    );
    server.shutdown().await.unwrap();
}
