//! Real multi-node clusters under faults, audited by loadgen: a three-node NATS cluster
//! (JetStream R3, a current nats-server), the shared three-node Cassandra ring (RF 3), and
//! processes partitioned for real in network namespaces (veth links set down). Most tests run
//! loadgen over the cluster, break one node while the load runs, and assert the audit: no acked
//! message lost, no duplicate, no gap, every send answered, and the flow back within a bound.
//! One kills a ring node under the store alone and reads back what it acknowledged.
//!
//! The tests take turns (one lock): they share the ring and two cores, and a kill in one must
//! not be read as a fault by another. Partitions need root (`ip netns`).

// The helpers fail a test by panicking; clippy.toml's test allowance covers only `#[test]` fns.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use loadgen::schedule::Phase;
use loadgen::{Config, Report};
use protocol::ChatMessage;
use storage::cql::{CqlConfig, CqlStore, Replication};
use storage::{HistoryStore, PageQuery, RoomAppend};
use testkit::{Cluster, InsideRelay, NatsNodeAt, Netns, Relay};

/// One test at a time.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_chat"))
}

/// Sends per second over the whole run.
const RATE: f64 = 40.0;
/// How long the load runs; the fault comes at [`FAULT_AT`].
const LOAD: Duration = Duration::from_secs(16);
const FAULT_AT: Duration = Duration::from_secs(5);

/// 40 clients in 4 rooms of 10 spread over `urls`, `RATE` sends/s for `LOAD`, a long drain so
/// sends held by a fault are answered before the audit.
fn load(urls: Vec<String>, prefix: &str) -> Config {
    Config {
        urls,
        clients: 40,
        rooms: 4,
        rooms_per_client: 1,
        phases: vec![Phase { duration: LOAD, rate: RATE }],
        ramp: 0.0,
        history_rate: 1.0,
        seed: 11,
        drain: Duration::from_secs(30),
        prefix: prefix.into(),
        progress: false,
        ..Config::default()
    }
}

/// Runs `config` and, concurrently, `fault` (which starts at once: it sleeps to its moment).
async fn audited<F: Future<Output = ()>>(config: Config, fault: F) -> Report {
    let run = tokio::spawn(async move { loadgen::run(config).await });
    fault.await;
    tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("loadgen finished in time")
        .expect("loadgen task")
        .expect("loadgen carried out")
}

/// The audit passed (nothing acked was lost, duplicated, reordered or gapped; every send was
/// answered, ack or error), and acks never stopped for longer than `bound` (so the flow came
/// back within it).
fn assert_clean(report: &Report, bound: Duration) {
    let audit = &report.audit;
    let shown: Vec<_> = audit.findings.iter().filter(|f| f.kind.fails()).take(10).collect();
    assert!(report.passed, "{}\nfailing findings: {shown:#?}", report.summary());
    let timeline: Vec<String> =
        report.timeline.iter().map(|s| format!("{:.0}s:{}/{}/{}", s.t, s.sent, s.acked, s.errors)).collect();
    eprintln!("per second sent/acked/errors: {}", timeline.join(" "));
    eprintln!("errors: {:?}", report.errors);
    let stall = longest_ack_stall(report);
    eprintln!("acked {} of {}; longest stretch without an ack: {stall:?}", audit.acked, audit.scheduled);
    assert!(stall <= bound, "acks stopped for {stall:?} (bound {bound:?})\n{}", report.summary());
}

/// The longest run of seconds inside the measured phase in which no send was acked.
fn longest_ack_stall(report: &Report) -> Duration {
    let (start, end) = (report.timing.measure_start_s, report.timing.measure_start_s + report.timing.measure_s);
    let (mut longest, mut current) = (0.0f64, 0.0f64);
    for second in report.timeline.iter().filter(|s| s.t > 0.0 && s.t <= end - start) {
        current = if second.acked == 0 { current + second.dt } else { 0.0 };
        longest = longest.max(current);
    }
    Duration::from_secs_f64(longest)
}

fn gateway_urls(cluster: &Cluster, count: usize) -> Vec<String> {
    (0..count).map(|i| cluster.gateway_ws(i)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_node_killed_under_load_loses_no_acked_message() {
    let _turn = TURN.lock().await;
    let nodes = vec![NatsNodeAt::loopback(); 3];
    let mut cluster = Cluster::builder(binary()).nats_cluster(nodes).gateways(2).workers(2).start().await;
    let config = load(gateway_urls(&cluster, 2), "nkill");
    let report = audited(config, async {
        tokio::time::sleep(FAULT_AT).await;
        // The stream's leader goes: the other two must elect a new one.
        let leader =
            cluster.nats_cluster_mut().stream_leader("CHAT_SEND", 0).await.expect("the send stream has a leader");
        eprintln!("killing NATS node {} (the send stream's leader)", leader + 1);
        cluster.nats_cluster_mut().kill(leader).await;
    })
    .await;
    assert_clean(&report, Duration::from_secs(15));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cassandra_node_killed_under_load_loses_no_acked_message() {
    let _turn = TURN.lock().await;
    let ring = tokio::task::spawn_blocking(testkit::cassandra_ring).await.unwrap();
    let cluster = Cluster::builder(binary())
        .cql(ring)
        .gateway_arg("--replication")
        .gateway_arg("3")
        .worker_arg("--replication")
        .worker_arg("3")
        .gateways(2)
        .workers(2)
        .start()
        .await;
    let config = load(gateway_urls(&cluster, 2), "ckill");
    let report = audited(config, async {
        tokio::time::sleep(FAULT_AT).await;
        tokio::task::spawn_blocking(|| testkit::kill_ring_node(3)).await.unwrap();
    })
    .await;
    // The ring stays whole for the next test.
    tokio::task::spawn_blocking(|| testkit::restart_ring_node(3)).await.unwrap();
    assert_clean(&report, Duration::from_secs(10));
}

/// A ring node frozen (SIGSTOP) for 8 s under load, with hedged requests on: the requests it
/// coordinates are sent to another node after 200 ms, so the flow never stops and no send is
/// refused (without hedging, each request it coordinates waits out the 1 s timeout, and about a
/// third of the sends in the freeze were refused); nothing acked is lost. A send whose write the
/// frozen node held past the gateway's 4.95 s is answered `internal` (not known yet), which is
/// no refusal; it must then have been stored (one in 640 was, in one CI run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cassandra_node_frozen_under_load_with_hedged_requests_refuses_nothing() {
    let _turn = TURN.lock().await;
    let ring = tokio::task::spawn_blocking(testkit::cassandra_ring).await.unwrap();
    let store = CqlStore::connect(ring_config(&ring, "freezewarm", 3)).await.expect("connect to the ring");
    warm_ring(&store).await;
    drop(store);
    let mut builder = Cluster::builder(binary()).cql(ring).gateways(2).workers(2);
    for arg in ["--replication", "3", "--cql-hedge-ms", "200"] {
        builder = builder.gateway_arg(arg).worker_arg(arg);
    }
    let cluster = builder.start().await;
    let config = load(gateway_urls(&cluster, 2), "cfreeze");
    let report = audited(config, async {
        tokio::time::sleep(FAULT_AT).await;
        let frozen = testkit::freeze_ring_node(3);
        tokio::time::sleep(Duration::from_secs(8)).await;
        drop(frozen);
    })
    .await;
    assert_clean(&report, Duration::from_secs(3));
    let not_known = report.errors.get("internal").copied().unwrap_or(0);
    let refused: u64 = report.errors.values().sum::<u64>() - not_known;
    assert_eq!(refused, 0, "sends refused with a ring node frozen: {:?}", report.errors);
    assert_eq!(
        report.audit.counts.unknown_then_stored,
        not_known,
        "every send answered `internal` was stored after all: {}",
        report.summary()
    );
}

/// A ring node killed -9 comes back with every write it acknowledged before its last commit log
/// sync, in tables whose schema changed just before (`ALTER TABLE ... ADD`, as the schema's own
/// steps do). The keyspace has RF 1, so no other replica hides what the killed node lost. A node
/// whose schema changes lived only in its commit log skipped those tables' rows on replay, or
/// refused to start when a row named a column its loaded schema lacked (CI, 2026-12-04).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cassandra_node_killed_comes_back_with_every_write_it_acknowledged() {
    let _turn = TURN.lock().await;
    let ring = tokio::task::spawn_blocking(testkit::cassandra_ring).await.unwrap();
    let config = ring_config(&ring, "crash", 1);
    let store = CqlStore::connect(config.clone()).await.expect("connect to the ring");
    // 30 rooms: each of the three nodes owns some (all on two nodes: one chance in 10^5).
    let (rooms, written) = write_rooms(&store, "crash", 30, 3).await;
    drop(store);
    // Periodic sync: what a node acknowledged in its last period is in its commit log, but not yet
    // behind a sync marker, and a crash loses it on that node (RF 3 keeps it on the others).
    tokio::time::sleep(COMMITLOG_SYNC_PERIOD + Duration::from_secs(1)).await;

    tokio::task::spawn_blocking(|| testkit::kill_ring_node(3)).await.unwrap();
    tokio::task::spawn_blocking(|| testkit::restart_ring_node(3)).await.unwrap();

    let store = CqlStore::connect(config).await.expect("connect to the ring after the restart");
    for (room, messages) in rooms.iter().zip(&written) {
        let page = store.page(room, PageQuery::newest(10)).await.expect("read a room after the restart");
        assert_eq!(&page.messages, messages, "room {room} after ring node 3 was killed and restarted");
    }
}

/// With hedged requests on (`--cql-hedge-ms`), a ring node frozen (SIGSTOP: its
/// connections stay open, nothing is answered) does not fail the store's reads: a read the frozen
/// node coordinates is sent to another node after a short wait (at most half the request timeout).
/// Without it (the default), about one read in three (those the frozen node coordinates) fails
/// after the timeout, and each failed read is a send refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_through_a_frozen_ring_node_are_answered_by_another_node() {
    let _turn = TURN.lock().await;
    let ring = tokio::task::spawn_blocking(testkit::cassandra_ring).await.unwrap();
    let config = CqlConfig { hedge_after: Some(Duration::from_millis(200)), ..ring_config(&ring, "frozen", 3) };
    let timeout = config.request_timeout;
    let store = CqlStore::connect(config).await.expect("connect to the ring");
    let (rooms, written) = write_rooms(&store, "frozen", 12, 2).await;

    // Each coordinator also sends a read to a second replica once the first is slower than the
    // table's 99th percentile; a new table's threshold starts at half the read timeout (2.5 s),
    // and Cassandra sets it from the latencies it has seen once per read timeout (5 s). So the
    // tables see some reads first (the warm-up's, in this keyspace), as any table in use has.
    warm_ring(&store).await;
    tokio::time::sleep(Duration::from_secs(6)).await;

    let frozen = testkit::freeze_ring_node(3);
    let mut slowest = Duration::ZERO;
    for round in 0..3 {
        for (room, messages) in rooms.iter().zip(&written) {
            let fail = |what: &str, e: storage::StoreError| format!("round {round}, room {room}: {what} failed: {e}");
            let keys = [(messages[1].user.as_str(), messages[1].client_msg_id.as_str())];
            let started = std::time::Instant::now();
            let found = store
                .find_by_client_msg_ids(room, &keys)
                .await
                .unwrap_or_else(|e| panic!("{}", fail("dedupe read", e)));
            slowest = slowest.max(started.elapsed());
            assert_eq!(found, vec![Some(messages[1].clone())], "room {room}");
            let started = std::time::Instant::now();
            let page =
                store.page(room, PageQuery::newest(10)).await.unwrap_or_else(|e| panic!("{}", fail("page read", e)));
            slowest = slowest.max(started.elapsed());
            assert_eq!(&page.messages, messages, "room {room}");
            let started = std::time::Instant::now();
            assert_eq!(
                store.last_seq(room).await.unwrap_or_else(|e| panic!("{}", fail("last seq read", e))),
                2,
                "room {room}"
            );
            slowest = slowest.max(started.elapsed());
        }
    }
    drop(frozen);
    eprintln!("slowest operation with ring node 3 frozen: {slowest:?}");
    // Every operation above was answered: without hedging, each request the frozen node
    // coordinates fails at the timeout. A page is two requests in turn (its last seq, then its
    // rows), and each may wait up to half the timeout before its second copy is sent.
    assert!(slowest < 2 * timeout, "an operation took {slowest:?}, past two request timeouts ({timeout:?} each)");
}

/// A store on the shared ring, in a keyspace of its own with replication factor `rf`.
fn ring_config(ring: &str, keyspace_prefix: &str, rf: u32) -> CqlConfig {
    CqlConfig {
        nodes: ring.split(',').map(str::to_owned).collect(),
        keyspace: testkit::unique_keyspace(keyspace_prefix),
        replication: Replication::SimpleStrategy { rf },
        ..CqlConfig::default()
    }
}

/// Runs a send's store operations on the ring through `store` until they are quick or settled
/// (at most a minute). A ring just started, or with a node just restarted, is slow everywhere (its
/// JIT is cold), and a request is hedged only when it is slow against the others.
async fn warm_ring(store: &CqlStore) {
    let until = storage::warm::WarmUp { budget: Duration::from_secs(60), ..Default::default() };
    let warmed = storage::warm::warm_up(store, &storage::warm::room_of("multinode-test"), until).await;
    eprintln!("ring warmed: {warmed:?}");
}

/// Appends `per_room` messages (seqs 1..) to each of `rooms` rooms named `{prefix}-N`; returns
/// the rooms and, in the same order, the messages each holds.
async fn write_rooms(
    store: &CqlStore,
    prefix: &str,
    rooms: usize,
    per_room: u64,
) -> (Vec<String>, Vec<Vec<ChatMessage>>) {
    let rooms: Vec<String> = (0..rooms).map(|r| format!("{prefix}-{r}")).collect();
    let mut written = Vec::new();
    for room in &rooms {
        let messages: Vec<ChatMessage> = (1..=per_room).map(|seq| testkit::message(room, seq, "ann")).collect();
        let append = RoomAppend { room: room.clone(), expected_last_seq: 0, messages: messages.clone() };
        store.append(append).await.expect("append on the whole ring");
        written.push(messages);
    }
    (rooms, written)
}

/// `commitlog_sync_period` of the test nodes (deploy/cassandra/start).
const COMMITLOG_SYNC_PERIOD: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_under_load_loses_no_acked_message() {
    let _turn = TURN.lock().await;
    let mut cluster = Cluster::builder(binary()).gateways(2).workers(2).start().await;
    let config = load(gateway_urls(&cluster, 2), "wkill");
    let report = audited(config, async {
        tokio::time::sleep(FAULT_AT).await;
        cluster.kill_worker(0).await;
    })
    .await;
    assert_clean(&report, Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_under_load_its_clients_resume_on_the_other_without_loss() {
    let _turn = TURN.lock().await;
    let mut cluster = Cluster::builder(binary()).gateways(2).workers(1).start().await;
    let config = load(gateway_urls(&cluster, 2), "gkill");
    let report = audited(config, async {
        tokio::time::sleep(FAULT_AT).await;
        cluster.kill_gateway(0).await;
    })
    .await;
    assert_clean(&report, Duration::from_secs(10));
    assert!(report.clients.reconnects > 0, "the killed gateway's clients reconnected: {:?}", report.clients);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_partition_owner_resumed_after_its_partitions_moved_assigns_no_seq_twice() {
    let _turn = TURN.lock().await;
    let cluster = Cluster::builder(binary()).gateways(2).workers(2).start().await;
    let config = load(gateway_urls(&cluster, 2), "freeze");
    let report = audited(config, async {
        tokio::time::sleep(FAULT_AT).await;
        cluster.worker(0).signal("-STOP");
        // Ownership moves after 3 s without its heartbeat; JetStream redelivers its unacked
        // sends after ack_wait (8 s). Resume it after both, with its batches still in hand.
        tokio::time::sleep(Duration::from_secs(10)).await;
        cluster.worker(0).signal("-CONT");
    })
    .await;
    assert_clean(&report, Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_frozen_under_load_no_send_refused_is_stored() {
    let _turn = TURN.lock().await;
    let cluster = Cluster::builder(binary()).gateways(2).workers(1).start().await;
    let config = load(gateway_urls(&cluster, 2), "nfreeze");
    let report = audited(config, async {
        tokio::time::sleep(FAULT_AT).await;
        // Publishes written meanwhile wait in the socket; their JetStream answers come late or
        // never. A send told `unavailable` must not be stored when NATS comes back.
        cluster.nats().signal("-STOP");
        tokio::time::sleep(Duration::from_secs(7)).await;
        cluster.nats().signal("-CONT");
    })
    .await;
    assert_eq!(report.audit.counts.refused_but_delivered, 0, "{}", report.summary());
    assert_clean(&report, Duration::from_secs(15));
}

/// At [`FAULT_AT`], cuts `netns`'s link 0 for `length`, then heals it.
async fn partition_at_fault_time(netns: &Netns, length: Duration) {
    tokio::time::sleep(FAULT_AT).await;
    netns.cut(0);
    tokio::time::sleep(length).await;
    netns.heal(0);
}

/// The shared Cassandra node as seen from inside `netns`, at the address it advertises (so the
/// driver's view of the cluster holds there too), through link 0: a relay inside the namespace
/// to a relay on the link's host address. Both stop on drop.
async fn store_inside(netns: &Netns) -> (Relay, InsideRelay, String) {
    let cql = testkit::cassandra();
    let node: SocketAddr = cql.parse().expect("shared node address");
    let outside = Relay::start_on(netns.host_bind(0), node).await;
    let inside = netns.relay_inside(node, outside.addr());
    (outside, inside, cql)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_partitioned_from_nats_and_the_store_then_healed_audits_clean() {
    let _turn = TURN.lock().await;
    // Link 0 joins the gateway to the backends, link 1 to its clients: only link 0 is cut.
    let netns = Netns::create(2);
    let mut cluster =
        Cluster::builder(binary()).nats_host(netns.host_ip(0).into()).gateways(1).workers(1).start().await;
    let (_outside, _inside, cql) = store_inside(&netns).await;
    let nats = cluster.nats_url();
    let inside = cluster.add_gateway_in(&netns, 1, &nats, &cql).await;
    let config = load(vec![cluster.gateway_ws(0), cluster.gateway_ws(inside)], "gpart");
    let report = audited(config, async {
        partition_at_fault_time(&netns, Duration::from_secs(6)).await;
    })
    .await;
    // The partitioned gateway's clients get `unavailable` meanwhile; the others are served.
    assert_clean(&report, Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_partitioned_then_healed_audits_clean() {
    let _turn = TURN.lock().await;
    let netns = Netns::create(1);
    let mut cluster =
        Cluster::builder(binary()).nats_host(netns.host_ip(0).into()).gateways(2).workers(1).start().await;
    let (_outside, _inside, cql) = store_inside(&netns).await;
    let nats = cluster.nats_url();
    cluster.add_worker_in(&netns, 0, &nats, &cql).await;
    let config = load(gateway_urls(&cluster, 2), "wpart");
    let report = audited(config, async {
        partition_at_fault_time(&netns, Duration::from_secs(8)).await;
    })
    .await;
    assert_clean(&report, Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_node_partitioned_then_healed_audits_clean() {
    let _turn = TURN.lock().await;
    let netns = Netns::create(1);
    let nodes = vec![NatsNodeAt::loopback(), NatsNodeAt::loopback(), NatsNodeAt::inside(&netns, 0)];
    let mut cluster = Cluster::builder(binary()).nats_cluster(nodes).gateways(2).workers(2).start().await;
    let config = load(gateway_urls(&cluster, 2), "npart");
    let report = audited(config, async {
        partition_at_fault_time(&netns, Duration::from_secs(8)).await;
        cluster.nats_cluster_mut().wait_healthy(2).await;
    })
    .await;
    assert_clean(&report, Duration::from_secs(15));
}
