//! Fault injection, kept out of the product paths.
//!
//! Faults are requested at run time through the admin API ([`admin::router`],
//! `/admin/faults`) and held by a [`Faults`] registry. They act through decorators that wrap
//! the product's own interfaces, so gateway and fanout code reads as if faults did not exist:
//!
//! - [`bus::faulty_gateway_bus`] over a gateway's bus (sends, room feeds, readiness):
//!   `gateway.nats` (cut) and `gateway.feed`;
//! - [`bus::FaultyFanoutBus`] over a worker's bus: `fanout.sequence` and `fanout.publish`;
//! - [`clock::SkewedClock`] over a worker's clock: `fanout.clock`;
//! - [`deliver::FaultyDelivery`], the gateway's delivery hook: `gateway.deliver` and
//!   `gateway.gap_repair`;
//! - [`CrossLocks`], a worker's room hook: `fanout.lock` (room locks taken out of order).
//!
//! A [`FaultLayer`] wires them into one process; its [`Injector`] leaves the marks of every
//! fault that fires: a `fault.injected` hop in the message's journey, `chat_faults_injected_total`, a log
//! line. A *sealed* fault leaves none of these (see [`FaultSpec::sealed`]).

pub mod admin;
pub mod bus;
pub mod clock;
pub mod deliver;
mod hop;
mod layer;
mod lock;
mod marks;
mod registry;

pub use hop::{FaultAction, Hop};
pub use layer::FaultLayer;
pub use lock::{CrossLocks, HeldLock, LocalLocks, LockTable};
pub use marks::Injector;
pub use registry::{ActiveFault, FaultError, FaultSpec, Faults, Fired};
