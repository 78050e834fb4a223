//! Cases only the CQL store has: fencing by owner epochs, rows a fenced-off writer left behind,
//! a room left mid-append before epochs, and connecting.

use std::time::Duration;

use storage::cql::{CqlConfig, CqlCredentials, CqlStore, Holding, Taken};
use storage::{HistoryStore, PageQuery, RoomAppend, StoreErrorKind};

use crate::cases::{fill, messages};

/// Stores a room state as a writer from before epochs left it, cut off between its transaction
/// and its rows: `last_seq` and the `pending` record of the messages it never wrote.
async fn leave_legacy_claim(store: &CqlStore, room: &str, last_seq: u64, pending: &[protocol::ChatMessage]) {
    let json = serde_json::to_vec(pending).unwrap();
    let hex: String = json.iter().map(|b| format!("{b:02x}")).collect();
    let keyspace = store.keyspace();
    let cql =
        format!("INSERT INTO {keyspace}.room_state (room, last_seq, pending) VALUES ('{room}', {last_seq}, 0x{hex})");
    store.run_schema_statement(&cql).await.unwrap();
}

/// A writer from before epochs that died right after its transaction left only the pending
/// record; the next `last_seq` (from another session) finishes the append before answering, and
/// the room goes on under epochs.
#[tokio::test]
async fn last_seq_completes_an_append_interrupted_before_epochs() {
    crate::with_cassandra("interrupted_last_seq", async |writer, survivor| {
        // (The messages before them would be rows of their own; the record is what matters.)
        let lost = messages("crash", 1, 3);
        leave_legacy_claim(writer, "crash", 3, &lost).await;
        assert_eq!(survivor.get_by_id(lost[0].id).await.unwrap(), None, "nothing indexed before recovery");

        assert_eq!(survivor.last_seq("crash").await.unwrap(), 3);
        for m in &lost {
            let found = survivor.find_by_client_msg_id("crash", &m.user, &m.client_msg_id).await.unwrap();
            assert_eq!(found.as_ref(), Some(m), "dedupe entry of seq {}", m.seq);
            assert_eq!(survivor.get_by_id(m.id).await.unwrap().as_ref(), Some(m));
        }
        let page = survivor.page("crash", PageQuery::newest(50)).await.unwrap();
        assert_eq!(page.messages, lost);
        let next = RoomAppend { room: "crash".into(), expected_last_seq: 3, messages: messages("crash", 4, 4) };
        survivor.append(next).await.unwrap();
        assert_eq!(writer.last_seq("crash").await.unwrap(), 4);
    })
    .await;
}

/// A page over an append interrupted before epochs finishes it too, instead of a short page.
#[tokio::test]
async fn page_completes_an_append_interrupted_before_epochs() {
    crate::with_cassandra("interrupted_page", async |writer, reader| {
        let lost = messages("crash", 1, 3);
        leave_legacy_claim(writer, "crash", 3, &lost).await;
        let page = reader.page("crash", PageQuery::newest(50)).await.unwrap();
        assert_eq!(page.messages, lost);
        assert_eq!(reader.get_by_id(lost[2].id).await.unwrap().as_ref(), Some(&lost[2]));
    })
    .await;
}

/// Rows a writer wrote without committing them (fenced off, or dead, before its commit) are
/// invisible: not in the room's last seq, not found by client id or id, and the room's owner
/// writes its own messages over those seqs.
#[tokio::test]
async fn rows_never_committed_are_invisible_and_overwritten() {
    crate::with_cassandra("uncommitted", async |owner, zombie| {
        fill(owner, "r", 0, 2, 2).await;
        let orphans = messages("r", 3, 4);
        let uncommitted = RoomAppend { room: "r".into(), expected_last_seq: 2, messages: orphans.clone() };
        zombie.write_uncommitted(uncommitted).await.unwrap();
        assert_eq!(owner.last_seq("r").await.unwrap(), 2);
        for m in &orphans {
            assert_eq!(owner.find_by_client_msg_id("r", &m.user, &m.client_msg_id).await.unwrap(), None);
            assert_eq!(owner.get_by_id(m.id).await.unwrap(), None);
        }
        let found = owner.find_by_client_msg_ids("r", &[(&orphans[0].user, &orphans[0].client_msg_id)]).await;
        assert_eq!(found.unwrap(), vec![None]);

        // The owner's seq 3 replaces the orphan: the orphan's dedupe entry still points at seq 3,
        // and is not taken for it.
        let mut mine = messages("r", 3, 3);
        mine[0].client_msg_id = "mine-3".into();
        owner.append(RoomAppend { room: "r".into(), expected_last_seq: 2, messages: mine.clone() }).await.unwrap();
        assert_eq!(owner.page("r", PageQuery::newest(50)).await.unwrap().messages[2], mine[0]);
        assert_eq!(owner.find_by_client_msg_id("r", &orphans[0].user, &orphans[0].client_msg_id).await.unwrap(), None);
        assert_eq!(owner.get_by_id(orphans[0].id).await.unwrap(), None);
        assert_eq!(owner.get_by_id(mine[0].id).await.unwrap().as_ref(), Some(&mine[0]));
    })
    .await;
}

/// An append whose rows the node refuses fails before its commit is sent, and says so
/// (`NotCommitted`): the rows it did write (a first chunk of four messages) stay invisible, and
/// the next append from the same seq replaces them. Cassandra refuses the last message's dedupe
/// row for its partition key of over 64 KiB (a client id no gateway would pass on).
#[tokio::test]
async fn an_append_whose_rows_fail_is_not_committed_and_leaves_nothing_visible() {
    crate::with_cassandra("not_committed", async |store, other| {
        fill(store, "r", 0, 2, 2).await;
        let mut refused = messages("r", 3, 7);
        refused[4].client_msg_id = "k".repeat(70_000);
        let append = RoomAppend { room: "r".into(), expected_last_seq: 2, messages: refused.clone() };
        let error = store.append(append).await.expect_err("the node refuses the last message's rows");
        assert_eq!(error.kind(), StoreErrorKind::NotCommitted, "{error}");
        assert_eq!(other.last_seq("r").await.unwrap(), 2);
        for m in &refused[..4] {
            assert_eq!(other.find_by_client_msg_id("r", &m.user, &m.client_msg_id).await.unwrap(), None);
            assert_eq!(other.get_by_id(m.id).await.unwrap(), None);
        }
        let mut next = messages("r", 3, 4);
        for m in &mut next {
            m.client_msg_id = format!("next-{}", m.seq);
            m.id = uuid::Uuid::now_v7();
        }
        store.append(RoomAppend { room: "r".into(), expected_last_seq: 2, messages: next.clone() }).await.unwrap();
        assert_eq!(other.page("r", PageQuery::newest(50)).await.unwrap().messages[2..], next[..]);
        assert_eq!(other.find_by_client_msg_id("r", &refused[0].user, &refused[0].client_msg_id).await.unwrap(), None);
    })
    .await;
}

/// An append whose commit deadline has passed is given up before its commit (`NotCommitted`,
/// nothing visible), and one with time to spare is committed: the store's part of answering a
/// send by its deadline when the store hangs (a freeze: chat/tests/integration/cluster.rs).
#[tokio::test]
async fn an_append_given_up_at_its_commit_deadline_is_not_committed() {
    crate::with_cassandra("commit_by", async |store, other| {
        fill(store, "r", 0, 2, 2).await;
        let late = RoomAppend { room: "r".into(), expected_last_seq: 2, messages: messages("r", 3, 4) };
        let error = store.append_by(late, tokio::time::Instant::now()).await.expect_err("its deadline has passed");
        assert_eq!(error.kind(), StoreErrorKind::NotCommitted, "{error}");
        assert_eq!(other.last_seq("r").await.unwrap(), 2);
        let mut next = messages("r", 3, 3);
        next[0].client_msg_id = "next-3".into();
        let in_time = tokio::time::Instant::now() + Duration::from_secs(5);
        store
            .append_by(RoomAppend { room: "r".into(), expected_last_seq: 2, messages: next.clone() }, in_time)
            .await
            .unwrap();
        assert_eq!(other.page("r", PageQuery::newest(50)).await.unwrap().messages[2..], next[..]);
    })
    .await;
}

/// Two writers of one partition: the one that takes the fence later fences the other off. The
/// fenced-off writer's append is refused as `Fenced` and commits nothing (its rows are invisible
/// and the new owner's messages win); its next append takes the fence back, and then the other
/// one is fenced off in turn.
#[tokio::test]
async fn a_writer_fenced_off_commits_nothing_and_takes_the_fence_back_to_go_on() {
    crate::with_cassandra("fenced", async |old, new| {
        fill(old, "r", 0, 3, 3).await;
        // `new` takes the partition (it waits out the grace first) and goes on from seq 3.
        fill(new, "r", 3, 2, 2).await;
        let mut stale = messages("r", 4, 4);
        stale[0].client_msg_id = "stale-4".into();
        stale[0].id = uuid::Uuid::now_v7();
        let refused = old.append(RoomAppend { room: "r".into(), expected_last_seq: 3, messages: stale.clone() }).await;
        assert_eq!(refused.as_ref().err().map(|e| e.kind()), Some(StoreErrorKind::Fenced), "{refused:?}");
        assert_eq!(new.last_seq("r").await.unwrap(), 5);
        assert_eq!(old.find_by_client_msg_id("r", &stale[0].user, &stale[0].client_msg_id).await.unwrap(), None);
        assert_eq!(new.get_by_id(stale[0].id).await.unwrap(), None);
        assert_ne!(new.page("r", PageQuery::newest(50)).await.unwrap().messages[3].id, stale[0].id);

        // Sequencing again from the stored state: `old` takes the partition back.
        fill(old, "r", 5, 1, 1).await;
        let late =
            new.append(RoomAppend { room: "r".into(), expected_last_seq: 5, messages: messages("r", 6, 6) }).await;
        assert_eq!(late.err().map(|e| e.kind()), Some(StoreErrorKind::Fenced));
        let page = new.page("r", PageQuery::newest(50)).await.unwrap();
        assert_eq!(page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6]);
    })
    .await;
}

/// A writer whose partition moved lets its fence go: its appends there are refused from then on,
/// and the next owner, taking the fence, ends its grace early and goes on from what was
/// committed. A fence not let go is taken only after the whole grace; a writer let go of takes
/// the fence back the same way, and its old holder's appends are then fenced off.
#[tokio::test]
async fn a_fence_let_go_ends_the_next_owners_grace_and_refuses_the_old_owners_appends() {
    crate::with_cassandra("let_go", async |old, new| {
        let partition = protocol::subjects::partition("r");
        // Let go before it ever held it: nothing to say, and its appends there are refused too.
        assert!(!new.release_partition(partition).await.unwrap(), "nothing held, nothing to let go");
        fill(old, "r", 0, 3, 3).await;
        assert!(old.release_partition(partition).await.unwrap());
        assert!(!old.release_partition(partition).await.unwrap(), "let go once");
        let refused = old.append(RoomAppend { room: "r".into(), expected_last_seq: 3, messages: messages("r", 4, 4) });
        let refused = refused.await;
        assert_eq!(refused.as_ref().err().map(|e| e.kind()), Some(StoreErrorKind::Fenced), "{refused:?}");

        let held = new.hold_partition(partition).await.unwrap();
        assert_eq!(held, Holding { epoch: 2, taken: Some(Taken { from: Some(1), let_go: true }) });
        assert_eq!(new.hold_partition(partition).await.unwrap(), Holding { epoch: 2, taken: None });
        fill(new, "r", 3, 2, 2).await;

        // `new` did not let it go: `old` waits out the whole grace.
        let started = std::time::Instant::now();
        let held = old.hold_partition(partition).await.unwrap();
        assert_eq!(held, Holding { epoch: 3, taken: Some(Taken { from: Some(2), let_go: false }) });
        assert!(started.elapsed() >= Duration::from_secs(1), "{:?}", started.elapsed());
        fill(old, "r", 5, 1, 1).await;
        let late =
            new.append(RoomAppend { room: "r".into(), expected_last_seq: 5, messages: messages("r", 6, 6) }).await;
        assert_eq!(late.err().map(|e| e.kind()), Some(StoreErrorKind::Fenced));

        // Let go and wanted back by the same writer: taken anew, without the grace.
        assert!(old.release_partition(partition).await.unwrap());
        let held = old.hold_partition(partition).await.unwrap();
        assert_eq!(held, Holding { epoch: 4, taken: Some(Taken { from: Some(3), let_go: true }) });
        fill(old, "r", 6, 1, 1).await;
        let page = new.page("r", PageQuery::newest(50)).await.unwrap();
        assert_eq!(page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6, 7]);

        // A writer leaving lets every fence it holds go, its private rooms' too.
        fill(old, ".private", 0, 1, 1).await;
        assert_eq!(old.release_all().await, 2);
        assert_eq!(old.release_all().await, 0);
        let held = new.hold_partition(partition).await.unwrap();
        assert_eq!(held, Holding { epoch: 5, taken: Some(Taken { from: Some(4), let_go: true }) });
    })
    .await;
}

/// Connecting again to an existing keyspace re-applies the schema harmlessly.
#[tokio::test]
async fn reconnect_keeps_history() {
    crate::with_cassandra("reconnect", async |store, _| {
        fill(store, "kept", 0, 3, 3).await;
        let config =
            CqlConfig { nodes: vec![crate::cql_node()], keyspace: store.keyspace().into(), ..CqlConfig::default() };
        let again = crate::connect(config).await;
        assert_eq!(again.last_seq("kept").await.unwrap(), 3);
        again.ping().await.unwrap();
    })
    .await;
}

/// A keyspace from before the message chain (no `prev`, no `digest` column) gets both columns
/// on the next connect; its old rows read as unchained and new ones keep their chain fields.
#[tokio::test]
async fn a_keyspace_from_before_the_chain_is_migrated() {
    crate::with_cassandra("prechain", async |store, _| {
        let old = fill(store, "old", 0, 2, 2).await;
        let keyspace = store.keyspace();
        store.run_schema_statement(&format!("ALTER TABLE {keyspace}.messages DROP prev")).await.unwrap();
        store.run_schema_statement(&format!("ALTER TABLE {keyspace}.messages DROP digest")).await.unwrap();
        let config =
            CqlConfig { nodes: vec![crate::cql_node()], keyspace: store.keyspace().into(), ..CqlConfig::default() };
        let migrated = crate::connect(config.clone()).await;
        let page = migrated.page("old", PageQuery::newest(10)).await.unwrap();
        assert_eq!(page.messages, old, "old rows read back whole, without chain fields");
        assert!(page.messages.iter().all(|m| m.prev.is_none() && m.digest.is_none()));

        let mut next = crate::cases::messages("old", 3, 3);
        protocol::chain::seal(&mut next[0], protocol::chain::GENESIS.to_owned());
        migrated.append(RoomAppend { room: "old".into(), expected_last_seq: 2, messages: next.clone() }).await.unwrap();
        assert_eq!(migrated.get_by_id(next[0].id).await.unwrap(), Some(next[0].clone()));
        // Connecting once more finds both columns and leaves them be.
        let again = crate::connect(config).await;
        assert_eq!(again.page("old", PageQuery::newest(10)).await.unwrap().messages, [old, next].concat());
    })
    .await;
}

/// No node answering is `Unavailable`, promptly.
#[tokio::test]
async fn unreachable_node_is_unavailable() {
    let config = CqlConfig {
        nodes: vec!["127.0.0.1:1".into()],
        connect_timeout: Duration::from_secs(2),
        ..CqlConfig::default()
    };
    let result = tokio::time::timeout(Duration::from_secs(30), CqlStore::connect(config)).await.unwrap();
    match result {
        Err(e) if e.kind() == StoreErrorKind::Unavailable => {
            assert!(e.to_string().contains("127.0.0.1:1"), "{e}")
        }
        Err(other) => panic!("want unavailable, got {other:?}"),
        Ok(_) => panic!("connected to a closed port"),
    }
}

/// Bad names never reach CQL text, and are reported as configuration errors (not as an outage).
#[tokio::test]
async fn invalid_keyspace_is_refused() {
    let config = CqlConfig { keyspace: "chat; DROP KEYSPACE system".into(), ..CqlConfig::default() };
    let refused = CqlStore::connect(config).await.err().map(|e| e.kind());
    assert_eq!(refused, Some(StoreErrorKind::Config));
}

/// A replication factor of 0 is a configuration error, found before any node is asked.
#[tokio::test]
async fn zero_replication_is_a_configuration_error() {
    let config = CqlConfig {
        nodes: vec!["127.0.0.1:1".into()],
        replication: storage::cql::Replication::SimpleStrategy { rf: 0 },
        ..CqlConfig::default()
    };
    let refused = CqlStore::connect(config).await.err().map(|e| e.kind());
    assert_eq!(refused, Some(StoreErrorKind::Config));
}

/// Several datacenters without the local one named is a configuration error: LOCAL_SERIAL
/// transactions coordinated in two datacenters could both win.
#[tokio::test]
async fn multi_datacenter_replication_needs_the_local_datacenter() {
    let dcs = [("dc1".to_owned(), 3), ("dc2".to_owned(), 3)].into_iter().collect();
    let config = CqlConfig {
        nodes: vec!["127.0.0.1:1".into()],
        replication: storage::cql::Replication::NetworkTopology { dcs },
        connect_timeout: Duration::from_secs(1),
        ..CqlConfig::default()
    };
    let refused = CqlStore::connect(config.clone()).await.err().map(|e| e.kind());
    assert_eq!(refused, Some(StoreErrorKind::Config));
    // Named, it goes on to connect (and finds no node at this address).
    let config = CqlConfig { local_datacenter: Some("dc1".into()), ..config };
    let refused = CqlStore::connect(config).await.err().map(|e| e.kind());
    assert_eq!(refused, Some(StoreErrorKind::Unavailable));
}

/// The largest append a worker makes (1024 sends of one room) of the largest bodies (4000
/// characters: four-byte ones, and control characters JSON escapes to six bytes)
/// is about 20 MB, beyond the 16 MiB a single mutation may have: it is stored completely and in
/// order all the same, every message findable by its client id and its id, and fenced as ever.
#[tokio::test]
async fn a_batch_of_large_messages_is_stored_completely() {
    crate::with_cassandra("large_batch", async |store, other| {
        fill(store, "big", 0, 3, 3).await;
        let mut batch = messages("big", 4, 1027);
        for (i, message) in batch.iter_mut().enumerate() {
            let glyph = char::from_u32(0x1F600 + (i as u32 % 64)).unwrap();
            let body: String = [glyph, '\u{7}'].into_iter().cycle().take(3990).collect();
            message.body = format!("{body}{i:>10}");
        }
        let append = RoomAppend { room: "big".into(), expected_last_seq: 3, messages: batch.clone() };
        store.append(append).await.expect("a large batch is stored");

        assert_eq!(other.last_seq("big").await.unwrap(), 1027);
        let mut stored = Vec::new();
        for first in (3..1027).step_by(200) {
            let page = other.page("big", PageQuery::between(first, 1028.min(first + 201))).await.unwrap();
            stored.extend(page.messages);
        }
        assert!(stored == batch, "every message, in order: {} of {} stored", stored.len(), batch.len());
        for m in [&batch[0], &batch[511], &batch[1023]] {
            let found = other.find_by_client_msg_id("big", &m.user, &m.client_msg_id).await.unwrap();
            assert_eq!(found.as_ref(), Some(m), "dedupe entry of seq {}", m.seq);
            assert_eq!(other.get_by_id(m.id).await.unwrap().as_ref(), Some(m));
        }
        // The room goes on after it, fenced as ever.
        let stale = RoomAppend { room: "big".into(), expected_last_seq: 3, messages: messages("big", 4, 4) };
        assert_eq!(store.append(stale).await.err().and_then(|e| e.conflict_seqs()), Some((3, 1027)));
        fill(store, "big", 1027, 2, 2).await;
    })
    .await;
}

/// A node of its own with password authentication and client TLS (`deploy/cassandra/start
/// --auth --tls-dir`; the test fails when it cannot be started): the store logs in over TLS,
/// verifying the node against the node's CA, and appends and reads; a wrong password, no
/// credentials, and TLS trusting another CA are each refused as a configuration error, saying
/// which.
#[tokio::test]
async fn a_node_with_authentication_and_tls_admits_only_a_verified_login() {
    let node = tokio::task::spawn_blocking(|| {
        let tls_dir = testkit::workspace_root().join("target/test-cassandra-secure/tls");
        let tls_dir = tls_dir.to_str().expect("a UTF-8 path").to_owned();
        testkit::DedicatedCassandra::start_with("test-cassandra-secure", 9152, 7152, &["--auth", "--tls-dir", &tls_dir])
    })
    .await
    .unwrap();
    let ca = node.dir().join("tls/ca.pem");
    let config = |user: Option<(&str, &str)>, tls_ca: Option<std::path::PathBuf>| CqlConfig {
        nodes: vec![node.addr.clone()],
        keyspace: crate::fresh_config("secure").keyspace,
        credentials: user.map(|(user, password)| CqlCredentials { user: user.into(), password: password.into() }),
        tls_ca,
        connect_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(10),
        ..CqlConfig::default()
    };

    let admitted = config(Some(("cassandra", "cassandra")), Some(ca.clone()));
    let store = CqlStore::connect(admitted.clone()).await.expect("the right role over verified TLS");
    let stored = fill(&store, "safe", 0, 3, 2).await;
    assert_eq!(store.last_seq("safe").await.unwrap(), 3);
    assert_eq!(store.page("safe", PageQuery::newest(10)).await.unwrap().messages, stored);
    store.drop_keyspace().await.unwrap();

    let refused = |config: CqlConfig, says: &'static str| async move {
        let e = match CqlStore::connect(config).await {
            Ok(_) => panic!("connected, but should be refused: {says}"),
            Err(e) => e,
        };
        assert_eq!(e.kind(), StoreErrorKind::Config, "{e}");
        assert!(e.to_string().contains(says), "{e}");
    };
    refused(
        config(Some(("cassandra", "not-the-password")), Some(ca.clone())),
        "authentication failed for role \"cassandra\"",
    )
    .await;
    refused(config(None, Some(ca.clone())), "requires authentication").await;
    let other_ca = tempfile::NamedTempFile::new().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let other = params.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap();
    std::fs::write(other_ca.path(), other.pem()).unwrap();
    refused(config(Some(("cassandra", "cassandra")), Some(other_ca.path().to_owned())), "TLS handshake failed").await;
    let not_pem = tempfile::NamedTempFile::new().unwrap();
    refused(config(Some(("cassandra", "cassandra")), Some(not_pem.path().to_owned())), "holds no certificate").await;
}

/// A warm-up runs a send's operations in rooms of its own until they are quick, and leaves
/// nothing in any client room (its rooms' names hold a dot, which client rooms cannot).
#[tokio::test]
async fn a_warm_up_works_in_its_own_rooms_until_the_store_is_quick() {
    crate::with_cassandra("warm_up", async |store, _| {
        use storage::warm::{room_of, warm_up, WarmUp};
        let until =
            WarmUp { window: 5, concurrency: 4, quick: Duration::from_secs(2), budget: Duration::from_secs(60) };
        let warmed = warm_up(store, &room_of("fanout-1"), until).await;
        assert!(warmed.warm, "{warmed:?}");
        for i in 0..4 {
            let room = format!(".warmup.fanout-1.{i}");
            assert_eq!(store.last_seq(&room).await.unwrap(), u64::from(warmed.rounds), "{room}");
        }
        assert!(!protocol::names::is_valid_room(".warmup.fanout-1.0"), "no client can join it");
    })
    .await;
}

/// A store routing by latency (`--cql-latency-aware`) connects, stores and reads as any other,
/// alone or with a preferred datacenter.
#[tokio::test]
async fn a_latency_aware_store_stores_and_reads() {
    for local_datacenter in [None, Some("datacenter1".to_owned())] {
        let config = CqlConfig { latency_aware: true, local_datacenter, ..crate::fresh_config("latency_aware") };
        let store = crate::connect(config).await;
        fill(&store, "la", 0, 120, 40).await;
        assert_eq!(store.last_seq("la").await.unwrap(), 120);
        let page = store.page("la", PageQuery::between(0, 121)).await.unwrap();
        assert_eq!(page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), (1..=120).collect::<Vec<_>>());
        store.drop_keyspace().await.unwrap();
    }
}
