//! End-to-end tests: real agents over real QUIC on loopback, real fjall stores,
//! real SQLite files, and the servers the harness starts itself: PostgreSQL,
//! Radicale (calendars) and PocketBase (a web app); CSV files (spreadsheets).

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
mod spreadsheets;
mod sync;
mod topology;
mod webapps;
