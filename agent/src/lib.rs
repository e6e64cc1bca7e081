//! The Concord agent: keeps one tool's records in two-way sync with peer agents.
//!
//! A change flows: the tool's connector captures it ([`tool`]), the core commits it
//! to the store as an Automerge change ([`core`], [`engine`], [`store`]), peer
//! sessions stream it over QUIC ([`peers`], [`replication`], [`transport`]), and each
//! receiving agent merges it and writes the result back into its own tool.
//! See ARCHITECTURE.md for the map and the invariants.

pub mod admin;
pub mod agent;
pub mod apps;
pub mod bench;
pub mod bench_mesh;
pub mod check;
pub mod config;
pub mod core;
pub mod demo;
pub mod engine;
pub mod identity;
pub mod logs;
pub mod mapping;
pub mod peers;
pub mod pg_server;
pub mod progress;
pub mod replication;
pub mod store;
pub mod telemetry;
pub mod tool;
pub mod transport;
