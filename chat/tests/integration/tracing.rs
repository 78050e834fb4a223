//! OTLP export: the spans of every hop of one message, from two processes (gateway and fanout
//! worker), arrive at a collector under the message's trace id. The collector here is a test
//! receiver that decodes the real OTLP protobuf.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message as _;
use serde_json::json;
use testkit::{ChatProcess, NatsServer};

use crate::support::*;

/// Spans received: trace id (hex) → (service name, span name).
type Received = Arc<Mutex<HashMap<String, Vec<(String, String)>>>>;

async fn receiver() -> (String, Received) {
    let received: Received = Arc::default();
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let sink = sink.clone();
            async move {
                let request = ExportTraceServiceRequest::decode(body).expect("valid OTLP protobuf");
                let mut sink = sink.lock().unwrap();
                for resource_spans in request.resource_spans {
                    let service = resource_spans
                        .resource
                        .iter()
                        .flat_map(|r| r.attributes.iter())
                        .find(|a| a.key == "service.name")
                        .and_then(|a| a.value.as_ref())
                        .map(|v| format!("{:?}", v.value))
                        .unwrap_or_default();
                    for scope in resource_spans.scope_spans {
                        for span in scope.spans {
                            let trace_id: String = span.trace_id.iter().map(|b| format!("{b:02x}")).collect();
                            sink.entry(trace_id).or_default().push((service.clone(), span.name));
                        }
                    }
                }
                ""
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, received)
}

#[tokio::test]
async fn spans_of_every_hop_share_the_message_trace_across_two_processes() {
    let (collector, received) = receiver().await;
    let nats = NatsServer::start().await;
    let cql = testkit::cassandra();
    let keyspace = testkit::unique_keyspace("tracing");
    let config = storage::cql::CqlConfig { nodes: vec![cql.clone()], keyspace: keyspace.clone(), ..Default::default() };
    storage::cql::CqlStore::connect(config).await.expect("Cassandra reachable");
    let backends = vec!["--nats".to_owned(), nats.url(), "--cql".into(), cql, "--keyspace".into(), keyspace];
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", collector.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100")];
    let binary = Path::new(env!("CARGO_BIN_EXE_chat"));
    // The worker takes sends only once it has warmed the store up (at most 5 s here, on the
    // shared test node); `/readyz` says when.
    let mut fanout_args =
        vec!["fanout".to_owned(), "--listen".into(), "127.0.0.1:0".into(), "--warm-up-secs".into(), "5".into()];
    fanout_args.extend(backends.clone());
    let fanout = ChatProcess::start(binary, &fanout_args, &env).await;
    fanout.wait_ready().await;
    let mut gateway_args = vec!["gateway".to_owned(), "--listen".into(), "127.0.0.1:0".into()];
    gateway_args.extend(backends);
    let gateway = ChatProcess::start(binary, &gateway_args, &env).await;
    gateway.wait_ready().await;

    let mut alice = Client::login(&gateway.ws_url(), "alice").await;
    alice.join("traced").await;
    alice.send(json!({"type": "send", "room": "traced", "client_msg_id": "t1", "body": "follow me"})).await;
    let message = alice.messages(1).await.remove(0);
    let trace_id = message["trace_id"].as_str().unwrap().to_owned();

    let expected = [
        "gateway.receive",
        "bus.publish",
        "fanout.consume",
        "fanout.sequence",
        "store.append",
        "fanout.publish",
        "gateway.deliver",
        "ws.write",
    ];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let spans = received.lock().unwrap().get(&trace_id).cloned().unwrap_or_default();
        let names: HashSet<&str> = spans.iter().map(|(_, name)| name.as_str()).collect();
        let services: HashSet<&str> = spans.iter().map(|(service, _)| service.as_str()).collect();
        if expected.iter().all(|hop| names.contains(hop)) {
            assert!(services.len() >= 2, "spans from two processes expected, got {services:?}");
            let fanout_side: HashSet<&str> =
                spans.iter().filter(|(s, _)| s.contains("fanout")).map(|(_, n)| n.as_str()).collect();
            assert!(fanout_side.contains("fanout.sequence") && fanout_side.contains("store.append"), "{spans:?}");
            let gateway_side: HashSet<&str> =
                spans.iter().filter(|(s, _)| s.contains("gateway")).map(|(_, n)| n.as_str()).collect();
            assert!(gateway_side.contains("gateway.receive") && gateway_side.contains("ws.write"), "{spans:?}");
            return;
        }
        assert!(Instant::now() < deadline, "missing hops for trace {trace_id}: have {names:?}, want {expected:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
