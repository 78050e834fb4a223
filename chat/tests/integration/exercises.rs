//! The debugging exercises of docs/exercises/: each set-up produces the fault it describes.

use crate::support::*;

#[tokio::test]
async fn exercise_placeholder() {
    let server = server().await;
    server.shutdown().await.unwrap();
}
