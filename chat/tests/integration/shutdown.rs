//! Draining on shutdown: `reconnect`, then close 1012.

use crate::support::*;

#[tokio::test]
async fn shutdown_sends_reconnect_then_closes_with_1012() {
    let server = server().await;
    let mut a = Client::login(&server.ws_url, "a").await;
    a.join("r").await;
    let stopping = tokio::spawn(server.shutdown());
    let frame = a.expect("reconnect").await;
    assert_eq!(frame["reason"], "draining");
    assert_eq!(a.closed().await, 1012);
    stopping.await.unwrap().unwrap();
}
