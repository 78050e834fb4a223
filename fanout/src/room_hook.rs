//! The worker's extension point around sequencing one room: [`RoomHook`]. The product runs
//! without one; the `faults` crate supplies one for the debugging lab (room locks taken in the
//! wrong order: a deadlock).

use async_trait::async_trait;

/// What a hook holds while a room's sends are sequenced; dropped when they are.
pub type Entered = Box<dyn Send>;

/// Called around the sequencing of each room's sends.
#[async_trait]
pub trait RoomHook: Send + Sync + 'static {
    /// Called before `room`'s sends are sequenced; what it returns is held until they are
    /// stored, delivered and answered.
    async fn enter(&self, room: &str) -> Option<Entered>;
}
