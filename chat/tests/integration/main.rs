//! Integration tests of the all-in-one server over real WebSockets on 127.0.0.1:0.
//! One test binary (modules below) keeps link time down.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod support;

mod auth;
mod bad_input;
mod chain;
mod cluster;
mod connections;
mod delivery;
mod durability;
mod exercises;
mod history;
mod http;
mod lab;
mod limits;
mod ops_access;
mod presence;
mod prometheus;
mod recording;
mod replay;
mod shutdown;
mod tracing;
