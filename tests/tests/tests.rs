//! End-to-end tests: real agents over real QUIC on loopback, real fjall stores,
//! real SQLite files.

mod bad_input;
mod durability;
mod identity;
mod postgres;
mod security;
mod sync;
mod topology;
