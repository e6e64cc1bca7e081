//! End-to-end tests: real agents over real QUIC on loopback, real fjall stores,
//! real SQLite files, and PostgreSQL servers the harness starts itself.

mod bad_input;
mod calendar;
mod conflicts;
mod durability;
mod identity;
mod mapping;
mod operate;
mod postgres;
mod postgres_sync;
mod security;
mod sync;
mod topology;
