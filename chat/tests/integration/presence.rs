//! Presence and typing.

use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn presence_follows_first_join_and_last_leave_and_typing_reaches_others() {
    let server = server().await;
    let mut alice = Client::login(&server.ws_url, "alice").await;
    let joined = alice.join("p").await;
    assert_eq!(joined["members"], json!(["alice"]));

    let mut bob = Client::login(&server.ws_url, "bob").await;
    let joined = bob.join("p").await;
    assert_eq!(joined["members"], json!(["alice", "bob"]));
    let online = alice.next().await;
    assert_eq!(online, json!({"type": "presence", "room": "p", "user": "bob", "state": "online"}));

    // A second connection of bob's is not news.
    let mut bob2 = Client::login(&server.ws_url, "bob").await;
    bob2.join("p").await;

    bob.send(json!({"type": "typing", "room": "p"})).await;
    assert_eq!(alice.next().await, json!({"type": "typing", "room": "p", "user": "bob"}));

    drop(bob2);
    bob.send(json!({"type": "leave", "room": "p"})).await;
    bob.expect("left").await;
    assert_eq!(alice.next().await, json!({"type": "presence", "room": "p", "user": "bob", "state": "offline"}));

    // Dropping the connection (no leave) also makes the user offline.
    let mut carol = Client::login(&server.ws_url, "carol").await;
    carol.join("p").await;
    assert_eq!(alice.next().await["state"], "online");
    drop(carol);
    assert_eq!(alice.next().await, json!({"type": "presence", "room": "p", "user": "carol", "state": "offline"}));
    server.shutdown().await.unwrap();
}
