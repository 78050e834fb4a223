//! The gateway's one extension point on its delivery side: what is written to a connection for
//! each live message, and whether missing messages are filled in from the store. The product
//! runs without a hook; the `faults` crate supplies one for exercises and the debugging lab.

use std::sync::Arc;

use async_trait::async_trait;
use uuid::Uuid;

use crate::outbox::Delivery;

/// Intercepts deliveries for every connection of a gateway.
pub trait DeliveryHook: Send + Sync + 'static {
    /// The interceptor of one connection, made when it opens (`session` as in `welcome`).
    fn connection(&self, session: Uuid) -> Box<dyn ConnectionWrites>;

    /// Whether gaps in a room's feed are repaired from the store right now.
    fn repairs_gaps(&self) -> bool;
}

/// Intercepts the live messages written to one connection.
#[async_trait]
pub trait ConnectionWrites: Send {
    /// What to write in place of `delivery`, in order (nothing, it, it twice, an earlier one...).
    async fn writes(&mut self, delivery: Arc<Delivery>) -> Vec<Arc<Delivery>>;

    /// Whether the next delivery would be written exactly as given, at once (nothing armed,
    /// nothing held back): the connection then writes it itself, and may write an ack and the
    /// sender's own copy together, as without a hook.
    fn passes_through(&self) -> bool {
        false
    }

    /// The slow-consumer policy of this connection, given the configured one.
    fn queue_policy(&self, configured: QueuePolicy) -> QueuePolicy {
        configured
    }
}

/// How a connection's outbound queue treats a client that reads slower than its rooms speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuePolicy {
    /// Frames the queue holds; what does not fit is skipped.
    pub capacity: usize,
    /// Whether skipped messages (and any gap in what the connection was written) are caught up
    /// from the store. The product always does.
    pub catch_up: bool,
}
