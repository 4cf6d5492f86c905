//! Test helpers shared by berth's crates. Everything here runs real things: the real test models
//! fetched by `scripts/fetch-test-models`, a real `docker-registry` and a real PostgreSQL on loopback, a real TCP proxy
//! that can cut a connection mid-transfer. Nothing here is a mock.

pub mod families;
pub mod models;
pub mod postgres;
pub mod proxy;
pub mod registry;
pub mod synthetic;

use std::net::TcpListener;

/// A port on loopback that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral port on 127.0.0.1")
}
