//! The NATS bus against a real nats-server (testkit starts one on a free port; the test fails
//! when `nats-server` is missing): a gateway's send reaches a fanout worker and the worker's
//! answer reaches the gateway, and the gateway's room feed gets the worker's delivery and a
//! room event.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test harness: a failed set-up step should panic

use std::sync::Arc;
use std::time::Duration;

use bus::nats::{NatsAuth, NatsBus, NatsConfig};
use bus::{BusHealth, FanoutBus, FeedItem, JourneyBus, RoomBus, RoomFeed, SendBus};
use futures_util::StreamExt;
use protocol::bus::{RoomEvent, SendCommand, SendOutcome};
use protocol::ChatMessage;
use telemetry::metrics::Metrics;

const WAIT: Duration = Duration::from_secs(15);

async fn connect(url: &str, name: &str) -> Arc<NatsBus> {
    let bus = NatsBus::connect(NatsConfig::new(url, name), Metrics::new()).await.expect("connect");
    let deadline = tokio::time::Instant::now() + WAIT;
    while let Err(e) = bus.ready().await {
        assert!(tokio::time::Instant::now() < deadline, "{name} not ready: {e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bus
}

/// The feed's next message or event. A `Resumed` may come first: the connection's first
/// `Connected` event can arrive after the feed started following it.
async fn next_item(feed: &mut RoomFeed) -> FeedItem {
    loop {
        match tokio::time::timeout(WAIT, feed.items.next()).await {
            Ok(Some(FeedItem::Resumed)) => continue,
            Ok(Some(item)) => return item,
            Ok(None) => panic!("feed of {} closed", feed.room),
            Err(_) => panic!("nothing on the feed of {} within {WAIT:?}", feed.room),
        }
    }
}

/// alice's send `client_msg_id` to `general` through `gateway-t`, with its deadline.
fn send_command(client_msg_id: &str, deadline_ms: i64) -> SendCommand {
    SendCommand {
        room: "general".into(),
        user: "alice".into(),
        client_msg_id: client_msg_id.into(),
        body: "hello".into(),
        traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
        gateway: "gateway-t".into(),
        deadline_ms,
    }
}

/// The message a worker stores for `command` as its room's first.
fn stored_as_first(command: &SendCommand) -> ChatMessage {
    ChatMessage {
        room: command.room.clone(),
        seq: 1,
        id: uuid::Uuid::now_v7(),
        user: command.user.clone(),
        body: command.body.clone(),
        ts: 1,
        client_msg_id: command.client_msg_id.clone(),
        trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
        prev: None,
        digest: None,
    }
}

#[tokio::test]
async fn a_send_round_trips_through_a_worker_and_the_room_feed_gets_the_delivery_and_events() {
    let nats = testkit::NatsServer::start().await;
    let gateway = connect(&nats.url(), "gateway-t").await;
    let worker = connect(&nats.url(), "fanout-t").await;
    worker.start_worker().await.expect("start worker");
    let mut feed = gateway.subscribe("general").await.expect("subscribe");

    let command = send_command("c-1", 0);
    let submitted = tokio::spawn({
        let (gateway, command) = (gateway.clone(), command.clone());
        async move { gateway.submit(command).await }
    });

    let mut batch = tokio::time::timeout(WAIT, worker.next_batch(10)).await.expect("a batch in time").expect("a batch");
    assert_eq!(batch.len(), 1);
    let send = batch.pop().unwrap();
    assert_eq!(
        (&send.command.room, &send.command.user, &send.command.client_msg_id, &send.command.body),
        (&command.room, &command.user, &command.client_msg_id, &command.body)
    );
    assert_eq!(send.delivery, 1);

    let stored = stored_as_first(&command);
    let traceparent = send.command.traceparent.clone();
    worker.deliver(Arc::new(stored.clone()), &traceparent).await.expect("deliver");
    let outcome = SendOutcome { message: stored.clone(), duplicate: false };
    send.reply.reply(Ok(outcome.clone())).await;

    let answered = tokio::time::timeout(WAIT, submitted).await.expect("an answer in time").unwrap();
    assert_eq!(answered.expect("stored"), outcome);

    match next_item(&mut feed).await {
        FeedItem::Message(message, header) => {
            assert_eq!(*message, stored);
            assert_eq!(header.as_deref(), Some(traceparent.as_str()));
        }
        other => panic!("expected the delivery, got {other:?}"),
    }

    let typing = RoomEvent::Typing { user: "bob".into() };
    gateway.publish_event("random", RoomEvent::Typing { user: "carol".into() }).await.expect("publish elsewhere");
    gateway.publish_event("general", typing.clone()).await.expect("publish");
    match next_item(&mut feed).await {
        FeedItem::Event(event) => assert_eq!(event, typing),
        other => panic!("expected the room's event, got {other:?}"),
    }
}

/// A worker that refuses a send without knowing whether its write landed (the store timed the
/// append out) does not settle it, so the gateway waits on; when the worker later finds the
/// write landed, its late ack is the send's answer.
#[tokio::test]
async fn a_late_ack_after_a_refusal_of_unknown_outcome_is_the_sends_answer() {
    let nats = testkit::NatsServer::start().await;
    let gateway = connect(&nats.url(), "gateway-t").await;
    let worker = connect(&nats.url(), "fanout-t").await;
    worker.start_worker().await.expect("start worker");
    let command = send_command("c-late", protocol::now_ms() + 5_000);
    let submitted = tokio::spawn({
        let (gateway, command) = (gateway.clone(), command.clone());
        async move { gateway.submit(command).await }
    });
    let mut batch = tokio::time::timeout(WAIT, worker.next_batch(10)).await.expect("a batch in time").expect("a batch");
    let send = batch.pop().unwrap();
    let late_ack = send.reply.late_ack().expect("a JetStream send can be acked late");
    send.reply.reply(Err(bus::BusError::unavailable("append timed out (outcome unknown)"))).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!submitted.is_finished(), "a refusal of unknown outcome is not the answer");

    let stored = stored_as_first(&command);
    let outcome = SendOutcome { message: stored, duplicate: false };
    late_ack.stored(outcome.clone()).await;
    let answered = tokio::time::timeout(WAIT, submitted).await.expect("an answer in time").unwrap();
    assert_eq!(answered.expect("acked late"), outcome);
}

/// A gateway follows a room with one subscription to `chat.*.<room>`. For a room called
/// `query` that wildcard also matches the journey queries every process publishes
/// (`chat.journal.query`): the feed passes on its room's deliveries and events only.
#[tokio::test]
async fn a_room_feed_passes_on_its_own_rooms_deliveries_and_events_only() {
    let nats = testkit::NatsServer::start().await;
    let gateway = connect(&nats.url(), "gateway-q").await;
    let worker = connect(&nats.url(), "fanout-q").await;
    let mut feed = gateway.subscribe("query").await.expect("subscribe");

    // A journey query: published on `chat.journal.query`, which the room's wildcard matches.
    let _ = gateway.remote_journeys(uuid::Uuid::now_v7()).await;
    gateway.publish_event("query-2", RoomEvent::Typing { user: "carol".into() }).await.expect("publish elsewhere");
    let mut stored = ChatMessage {
        room: "query".into(),
        seq: 1,
        id: uuid::Uuid::now_v7(),
        user: "alice".into(),
        body: "hello".into(),
        ts: 1,
        client_msg_id: "c-1".into(),
        trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
        prev: None,
        digest: None,
    };
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    stored.room = "queryx".into();
    worker.deliver(Arc::new(stored.clone()), traceparent).await.expect("deliver elsewhere");
    stored.room = "query".into();
    worker.deliver(Arc::new(stored.clone()), traceparent).await.expect("deliver");
    let typing = RoomEvent::Typing { user: "bob".into() };
    gateway.publish_event("query", typing.clone()).await.expect("publish");

    // Two publishers on two connections: the two may arrive in either order.
    let (mut delivered, mut told) = (false, false);
    for _ in 0..2 {
        match next_item(&mut feed).await {
            FeedItem::Message(message, _) if *message == stored => delivered = true,
            FeedItem::Event(event) if event == typing => told = true,
            other => panic!("expected the room's delivery and event, got {other:?}"),
        }
    }
    assert!(delivered && told, "delivered {delivered}, event {told}");
    let more = tokio::time::timeout(Duration::from_millis(300), next_item(&mut feed)).await;
    assert!(more.is_err(), "the feed passed on something not its room's: {more:?}");
}

/// A server that demands credentials: a bus with them gets ready, one without never does (and
/// says why), and a token works as well as a user and password.
#[tokio::test]
async fn a_server_with_authorization_admits_only_a_bus_with_credentials() {
    let server = testkit::NatsServer::start_with(&["--user", "chat", "--pass", "s3cret-pass"]).await;
    let with = |auth: NatsAuth| {
        let mut config = NatsConfig::new(server.url(), "gw-auth");
        config.auth = auth;
        NatsBus::connect(config, Metrics::new())
    };
    let admitted = with(NatsAuth::UserPassword { user: "chat".into(), password: "s3cret-pass".into() }).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while admitted.ready().await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "the bus with credentials never got ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for wrong in [NatsAuth::None, NatsAuth::UserPassword { user: "chat".into(), password: "guess".into() }] {
        let refused = with(wrong).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let why = refused.ready().await.expect_err("not admitted without the right credentials");
        assert!(why.to_string().contains("not connected"), "{why}");
    }

    let token_server = testkit::NatsServer::start_with(&["--auth", "a-long-shared-token"]).await;
    let mut config = NatsConfig::new(token_server.url(), "gw-token");
    config.auth = NatsAuth::Token("a-long-shared-token".into());
    let bus = NatsBus::connect(config, Metrics::new()).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while bus.ready().await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "the bus with the token never got ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A server that requires TLS: a bus that trusts the server's CA gets ready over TLS; one
/// without TLS, or trusting another CA, does not.
#[tokio::test]
async fn a_tls_server_admits_a_bus_that_verifies_it() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, pem: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let authority = |name: &str| {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert, key)
    };
    let (ca, ca_key) = authority("test CA");
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server_cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&server_key, &ca, &ca_key)
        .unwrap();
    let ca_file = write("ca.pem", ca.pem());
    let cert_file = write("server.pem", server_cert.pem());
    let key_file = write("server-key.pem", server_key.serialize_pem());
    let (other_ca, _) = authority("another CA");
    let other_ca_file = write("other-ca.pem", other_ca.pem());

    let server = testkit::NatsServer::start_with(&[
        "--tls",
        "--tlscert",
        cert_file.to_str().unwrap(),
        "--tlskey",
        key_file.to_str().unwrap(),
    ])
    .await;
    let with = |ca: Option<std::path::PathBuf>| {
        let mut config = NatsConfig::new(server.url(), "gw-tls");
        config.tls_ca = ca;
        NatsBus::connect(config, Metrics::new())
    };
    let verified = with(Some(ca_file)).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while let Err(e) = verified.ready().await {
        assert!(tokio::time::Instant::now() < deadline, "the bus trusting the server's CA never got ready: {e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for refused in [with(None).await.unwrap(), with(Some(other_ca_file)).await.unwrap()] {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(refused.ready().await.is_err(), "admitted without verifying the server");
    }
}

/// A server that lists its user by nkey: a bus holding that user's seed gets ready (it signs
/// the server's nonce); one with another user's seed, or with no credentials, does not.
#[tokio::test]
async fn a_server_with_nkey_users_admits_only_the_bus_with_the_seed() {
    let dir = tempfile::tempdir().unwrap();
    let user = nkeys::KeyPair::new_user();
    let config = dir.path().join("nats.conf");
    std::fs::write(&config, format!("authorization {{\n  users = [ {{ nkey: \"{}\" }} ]\n}}\n", user.public_key()))
        .unwrap();
    let server = testkit::NatsServer::start_with(&["-c", config.to_str().unwrap()]).await;
    let seed_file = |name: &str, pair: &nkeys::KeyPair| {
        let path = dir.path().join(name);
        std::fs::write(&path, pair.seed().unwrap()).unwrap();
        NatsAuth::nkey_seed_file(&path).unwrap()
    };
    let with = |auth: NatsAuth| {
        let mut config = NatsConfig::new(server.url(), "gw-nkey");
        config.auth = auth;
        NatsBus::connect(config, Metrics::new())
    };
    let admitted = with(seed_file("user.nk", &user)).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while let Err(e) = admitted.ready().await {
        assert!(tokio::time::Instant::now() < deadline, "the bus with the user's seed never got ready: {e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for wrong in [NatsAuth::None, seed_file("other.nk", &nkeys::KeyPair::new_user())] {
        let refused = with(wrong).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let why = refused.ready().await.expect_err("not admitted without the user's seed");
        assert!(why.to_string().contains("not connected"), "{why}");
    }
}

#[tokio::test]
async fn a_shared_lock_is_held_by_one_process_at_a_time_and_freed_when_dropped() {
    let nats = testkit::NatsServer::start().await;
    let (one, two) = (connect(&nats.url(), "fanout-1").await, connect(&nats.url(), "fanout-2").await);
    let (one, two) = (one.shared_locks(), two.shared_locks());
    let held = one.try_lock("room-lock.a").await.expect("NATS").expect("free at first");
    assert!(two.try_lock("room-lock.a").await.expect("NATS").is_none(), "held by the other process");
    assert!(two.try_lock("room-lock.b").await.expect("NATS").is_some(), "another lock is free");
    let waiting = tokio::spawn(async move { two.lock("room-lock.a").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "waits while the lock is held");
    drop(held);
    let taken = tokio::time::timeout(WAIT, waiting).await.expect("taken once released").expect("task");
    assert!(one.try_lock("room-lock.a").await.expect("NATS").is_none(), "now the other process holds it");
    drop(taken);
}

/// Announces `name` as a fanout worker on `chat.workers` each second until aborted, as a worker
/// process does.
fn heartbeat(client: async_nats::Client, name: &'static str) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            client.publish(protocol::subjects::WORKERS, name.into()).await.expect("publish a heartbeat");
            client.flush().await.expect("flush");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}

/// The partitions `worker` owns among `workers`.
fn share(worker: &str, workers: &[&str]) -> Vec<u32> {
    (0..protocol::subjects::PARTITIONS)
        .filter(|p| bus::nats::partition_owner(*p, workers.iter().copied()) == Some(worker))
        .collect()
}

#[tokio::test]
async fn a_worker_whose_connection_is_gone_loses_its_partitions_before_one_merely_silent() {
    let nats = testkit::NatsServer::start().await;
    let worker = connect(&nats.url(), "fanout-a").await;
    // Two peers fall silent at the same moment: `ghost` as a dead process does (nothing of it
    // is left on the server to answer a probe), `quiet` as a frozen one, or one whose
    // heartbeats are lost (its connection still answers probes).
    let ghost = async_nats::connect(nats.url()).await.expect("connect ghost");
    let quiet = async_nats::connect(nats.url()).await.expect("connect quiet");
    let mut probes = quiet.subscribe(protocol::subjects::worker_probe("quiet").unwrap()).await.expect("subscribe");
    let answering = {
        let quiet = quiet.clone();
        tokio::spawn(async move {
            while let Some(probe) = probes.next().await {
                quiet.publish(probe.reply.expect("a probe is a request"), "".into()).await.expect("answer");
            }
        })
    };
    let beats = [heartbeat(ghost, "ghost"), heartbeat(quiet, "quiet")];
    worker.start_worker().await.expect("start worker");
    let mut owned = worker.owned_partitions();
    let all = ["fanout-a", "ghost", "quiet"];
    let (mine, ghosts, quiets) = (share("fanout-a", &all), share("ghost", &all), share("quiet", &all));
    assert!(!ghosts.is_empty() && !quiets.is_empty(), "every worker owns some partitions: {ghosts:?} {quiets:?}");
    assert_eq!(*owned.borrow(), mine, "fanout-a took its share of three");

    // Past PROBE_TRUSTED_AFTER of fanout-a's connection, both fall silent.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(*owned.borrow(), mine, "nothing moved while all three were heard");
    for beat in &beats {
        beat.abort();
    }
    let silent_at = tokio::time::Instant::now();

    // Rendezvous hashing: each of ghost's partitions goes to whichever of the other two scores
    // higher for it.
    let with_ghosts = share("fanout-a", &["fanout-a", "quiet"]);
    assert_ne!(with_ghosts, mine, "fanout-a takes some of ghost's partitions");
    tokio::time::timeout(WAIT, owned.wait_for(|now| *now != mine)).await.expect("partitions move").expect("watch");
    assert_eq!(
        *owned.borrow(),
        with_ghosts,
        "ghost's partitions moved first, {:?} after the silence began, quiet's later",
        silent_at.elapsed()
    );
    tokio::time::timeout(WAIT, owned.wait_for(|now| now.len() == protocol::subjects::PARTITIONS as usize))
        .await
        .expect("quiet's partitions move once its silence runs out")
        .expect("watch");
    answering.abort();
}
