//! `gateway.deliver`, `gateway.gap_repair` and `gateway.outbox`: the gateway's delivery hook,
//! deciding per connection what is written for each live message, whether gaps are repaired,
//! and how a connection's queue treats a slow consumer.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use gateway::hook::{ConnectionWrites, DeliveryHook, QueuePolicy};
use gateway::outbox::Delivery;
use uuid::Uuid;

use crate::marks::Injector;
use crate::{FaultAction, Hop};

/// The delivery hook of a gateway with fault injection.
pub struct FaultyDelivery {
    injector: Injector,
}

impl FaultyDelivery {
    /// A hook applying the injector's faults.
    pub fn new(injector: Injector) -> Self {
        Self { injector }
    }
}

impl DeliveryHook for FaultyDelivery {
    fn connection(&self, session: Uuid) -> Box<dyn ConnectionWrites> {
        // A `gateway.outbox` drop applies to the connections opened while it is armed, for
        // their whole life (as a configuration would).
        let drops_when_full =
            self.injector.faults.armed(Hop::GatewayOutbox).inspect(|fired| self.injector.count(fired));
        Box::new(FaultyWrites {
            injector: self.injector.clone(),
            session,
            held: HashMap::new(),
            drops_when_full: drops_when_full.is_some(),
        })
    }

    fn repairs_gaps(&self) -> bool {
        self.injector.faults.armed(Hop::GatewayGapRepair).is_none()
    }
}

/// One connection's writes under `gateway.deliver` faults.
struct FaultyWrites {
    injector: Injector,
    session: Uuid,
    /// Held back by a `reorder`, per room, until the room's next message is written.
    held: HashMap<String, Arc<Delivery>>,
    /// Under `gateway.outbox` drop: a queue of one frame, and nothing skipped is caught up.
    drops_when_full: bool,
}

#[async_trait]
impl ConnectionWrites for FaultyWrites {
    async fn writes(&mut self, delivery: Arc<Delivery>) -> Vec<Arc<Delivery>> {
        let message = &delivery.message;
        let Some(fired) = self.injector.decide(Hop::GatewayDeliver, &message.room) else {
            let held = self.held.remove(&message.room);
            return std::iter::once(delivery).chain(held).collect();
        };
        self.injector.mark_message(
            &fired,
            message.id,
            &message.trace_id,
            serde_json::json!({"gateway": self.injector.process(), "session": self.session}),
        );
        match fired.action {
            FaultAction::Drop => Vec::new(),
            FaultAction::Duplicate => vec![delivery.clone(), delivery],
            FaultAction::Reorder => self.held.insert(message.room.clone(), delivery).into_iter().collect(),
            FaultAction::Delay => {
                tokio::time::sleep(fired.wait()).await;
                vec![delivery]
            }
            FaultAction::Rewrite => {
                let mut lie = (**message).clone();
                lie.body = format!("{} (edited in transit)", lie.body);
                vec![Arc::new(Delivery::new(Arc::new(lie)))]
            }
            // Not offered at this hop (refused when the fault is added).
            _ => vec![delivery],
        }
    }

    /// With no fault in force anywhere and nothing held, [`writes`](Self::writes) gives back
    /// the delivery it is given: the connection can skip it (a gateway that offers faults pays
    /// nothing for them until one is added).
    fn passes_through(&self) -> bool {
        self.held.is_empty() && !self.injector.faults.is_active()
    }

    fn queue_policy(&self, configured: QueuePolicy) -> QueuePolicy {
        match self.drops_when_full {
            true => QueuePolicy { capacity: 1, catch_up: false },
            false => configured,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FaultSpec, Faults};
    use protocol::ChatMessage;
    use telemetry::journal::Journal;
    use telemetry::metrics::Metrics;

    fn delivery(room: &str, seq: u64) -> Arc<Delivery> {
        Arc::new(Delivery::new(Arc::new(ChatMessage {
            room: room.into(),
            seq,
            id: Uuid::now_v7(),
            user: "u".into(),
            body: format!("m{seq}"),
            ts: 0,
            client_msg_id: format!("c{seq}"),
            trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
            prev: None,
            digest: None,
        })))
    }

    fn setup(spec: FaultSpec) -> (Box<dyn ConnectionWrites>, FaultyDelivery, Arc<Journal>) {
        let faults = Arc::new(Faults::default());
        faults.add(spec).unwrap();
        let journal = Arc::new(Journal::new("gw-1", 100));
        let hook = FaultyDelivery::new(Injector::new(faults, Metrics::new(), journal.clone()));
        (hook.connection(Uuid::now_v7()), hook, journal)
    }

    async fn written(writes: &mut Box<dyn ConnectionWrites>, delivery: Arc<Delivery>) -> Vec<(u64, String)> {
        writes.writes(delivery).await.iter().map(|d| (d.message.seq, d.message.body.clone())).collect()
    }

    #[tokio::test]
    async fn reorder_holds_a_message_until_the_rooms_next_one() {
        let spec = FaultSpec { count: Some(1), ..FaultSpec::new(Hop::GatewayDeliver, FaultAction::Reorder) };
        let (mut writes, _, _) = setup(spec);
        assert_eq!(written(&mut writes, delivery("r", 1)).await, vec![]);
        assert_eq!(written(&mut writes, delivery("r", 2)).await, vec![(2, "m2".into()), (1, "m1".into())]);
    }

    #[tokio::test]
    async fn writes_pass_through_only_with_no_fault_in_force_and_nothing_held() {
        let spec = FaultSpec { count: Some(1), ..FaultSpec::new(Hop::GatewayDeliver, FaultAction::Reorder) };
        let (mut writes, hook, _) = setup(spec);
        assert!(!writes.passes_through(), "a fault is in force");
        assert_eq!(written(&mut writes, delivery("r", 1)).await, vec![]);
        hook.injector.faults.clear(true);
        assert!(!writes.passes_through(), "message 1 is still held");
        assert_eq!(written(&mut writes, delivery("r", 2)).await, vec![(2, "m2".into()), (1, "m1".into())]);
        assert!(writes.passes_through());
    }

    #[tokio::test]
    async fn drop_duplicate_and_rewrite_are_marked_in_the_journey() {
        for (action, expected) in [
            (FaultAction::Drop, vec![]),
            (FaultAction::Duplicate, vec![(1, "m1".to_owned()), (1, "m1".to_owned())]),
            (FaultAction::Rewrite, vec![(1, "m1 (edited in transit)".to_owned())]),
        ] {
            let (mut writes, _, journal) = setup(FaultSpec::new(Hop::GatewayDeliver, action));
            let message = delivery("r", 1);
            let id = message.message.id;
            assert_eq!(written(&mut writes, message).await, expected, "{action:?}");
            let journey = journal.get(id).expect("marked");
            assert_eq!(journey.hops[0].hop, "fault.injected");
            assert_eq!(journey.hops[0].detail["action"], action.name());
            assert_eq!(journey.hops[0].detail["hop"], "gateway.deliver");
        }
    }

    #[tokio::test]
    async fn a_sealed_fault_acts_but_leaves_no_mark() {
        let spec = FaultSpec { sealed: true, ..FaultSpec::new(Hop::GatewayDeliver, FaultAction::Drop) };
        let (mut writes, _, journal) = setup(spec);
        let message = delivery("r", 1);
        let id = message.message.id;
        assert!(written(&mut writes, message).await.is_empty());
        assert!(journal.get(id).is_none());
    }

    #[test]
    fn connections_opened_under_an_outbox_drop_get_one_slot_and_no_catch_up() {
        let configured = QueuePolicy { capacity: 1024, catch_up: true };
        let spec = FaultSpec { sealed: true, ..FaultSpec::new(Hop::GatewayOutbox, FaultAction::Drop) };
        let (before, hook, _) = setup(spec);
        assert_eq!(before.queue_policy(configured), QueuePolicy { capacity: 1, catch_up: false });
        hook.injector.faults.clear(true);
        assert_eq!(before.queue_policy(configured).capacity, 1, "for the connection's whole life");
        assert_eq!(hook.connection(Uuid::now_v7()).queue_policy(configured), configured);
    }

    #[test]
    fn gap_repair_is_off_while_a_disable_fault_is_armed() {
        let (_, hook, _) = setup(FaultSpec::new(Hop::GatewayGapRepair, FaultAction::Disable));
        assert!(!hook.repairs_gaps());
        hook.injector.faults.clear(true);
        assert!(hook.repairs_gaps());
    }
}
