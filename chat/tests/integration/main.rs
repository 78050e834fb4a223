//! Integration tests of the all-in-one server over real WebSockets on 127.0.0.1:0.
//! One test binary (modules below) keeps link time down.

mod support;

mod auth;
mod cluster;
mod bad_input;
mod delivery;
mod exercises;
mod durability;
mod history;
mod http;
mod limits;
mod presence;
mod prometheus;
mod shutdown;
mod tracing;
