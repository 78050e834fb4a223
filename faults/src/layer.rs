//! [`FaultLayer`]: what a process wires in to make faults injectable, in one place.

use std::sync::Arc;

use axum::Router;
use bus::FanoutBus;
use fanout::{Clock, SystemClock};
use gateway::GatewayDeps;
use telemetry::journal::Journal;
use telemetry::metrics::Metrics;

use crate::bus::{faulty_gateway_bus, FaultyFanoutBus};
use crate::clock::SkewedClock;
use crate::deliver::FaultyDelivery;
use crate::lock::LockTable;
use crate::marks::Injector;
use crate::registry::Faults;
use crate::Hop;

/// The fault layer of one process. With an admin token, its decorators wrap the bus, the
/// clock and the gateway's deliveries, and its routes serve `/admin/faults`; without one,
/// nothing is wrapped (the product runs untouched) and the routes answer 404.
pub struct FaultLayer {
    injector: Option<Injector>,
    token: Option<String>,
    faults: Arc<Faults>,
}

impl FaultLayer {
    /// The layer of a process whose admin API is guarded by `admin_token` (off when `None`).
    pub fn new(admin_token: Option<String>, metrics: Metrics, journal: Arc<Journal>) -> Self {
        let faults = Arc::new(Faults::default());
        let injector = admin_token.is_some().then(|| Injector::new(faults.clone(), metrics, journal));
        Self { injector, token: admin_token, faults }
    }

    /// The faults in force (for a lab planting sealed faults in-process).
    pub fn faults(&self) -> &Arc<Faults> {
        &self.faults
    }

    /// A gateway's dependencies with this layer wired in: when faults are on, its bus wrapped
    /// and its delivery hook set; the admin routes in any case.
    pub fn wire_gateway(&self, deps: GatewayDeps) -> GatewayDeps {
        let routes = deps.routes.merge(self.routes());
        match &self.injector {
            Some(injector) => GatewayDeps {
                bus: faulty_gateway_bus(deps.bus, injector),
                delivery_hook: Some(Arc::new(FaultyDelivery::new(injector.clone()))),
                routes,
                ..deps
            },
            None => GatewayDeps { routes, ..deps },
        }
    }

    /// A worker's bus, wrapped when faults are on.
    pub fn fanout_bus(&self, bus: Arc<dyn FanoutBus>) -> Arc<dyn FanoutBus> {
        match &self.injector {
            Some(injector) => Arc::new(FaultyFanoutBus::new(bus, injector.clone())),
            None => bus,
        }
    }

    /// The clock a worker stamps `ts` with: the system's, skewable when faults are on.
    pub fn clock(&self) -> Arc<dyn Clock> {
        match &self.injector {
            Some(injector) => Arc::new(SkewedClock::new(Arc::new(SystemClock), injector.clone())),
            None => Arc::new(SystemClock),
        }
    }

    /// The room hook a worker enters around each room's sequencing, when faults are on; its
    /// room locks live in `locks` (this process's memory for one worker, a table shared on NATS
    /// for several).
    pub fn room_hook(&self, locks: Arc<dyn LockTable>) -> Option<Arc<dyn fanout::RoomHook>> {
        self.injector.as_ref().map(|injector| Arc::new(crate::lock::CrossLocks::new(injector.clone(), locks)) as _)
    }

    /// The gate a worker asks before each heartbeat (`fanout.heartbeat`), when faults are on.
    pub fn heartbeat_gate(&self) -> Option<bus::nats::HeartbeatGate> {
        let injector = self.injector.clone()?;
        Some(Arc::new(move || match injector.decide(Hop::FanoutHeartbeat, "") {
            Some(fired) => {
                injector.count(&fired);
                false
            }
            None => true,
        }))
    }

    /// The `/admin/faults` routes.
    pub fn routes<S: Clone + Send + Sync + 'static>(&self) -> Router<S> {
        crate::admin::router(self.faults.clone(), self.token.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FaultAction, FaultSpec};

    fn layer(token: Option<&str>) -> (FaultLayer, Metrics) {
        let metrics = Metrics::new();
        let layer = FaultLayer::new(token.map(str::to_owned), metrics.clone(), Arc::new(Journal::new("w", 10)));
        (layer, metrics)
    }

    #[test]
    fn heartbeats_pass_until_a_drop_fires_and_a_sealed_drop_is_not_counted() {
        assert!(layer(None).0.heartbeat_gate().is_none(), "no admin token, no seam");
        for sealed in [false, true] {
            let (layer, metrics) = layer(Some("t"));
            let gate = layer.heartbeat_gate().unwrap();
            assert!(gate());
            let spec = FaultSpec { count: Some(2), sealed, ..FaultSpec::new(Hop::FanoutHeartbeat, FaultAction::Drop) };
            layer.faults().add(spec).unwrap();
            assert_eq!([gate(), gate(), gate()], [false, false, true]);
            let counted = metrics.faults_injected.with_label_values(&["fanout.heartbeat", "drop"]).get();
            assert_eq!(counted, if sealed { 0 } else { 2 });
        }
    }
}
