//! Connectors to the tools Concord keeps in sync.
//!
//! A connector captures the changes a tool makes to its records and writes merged
//! records back. It speaks native records ([`crdt_model::Record`]) and durable
//! cursors, never Automerge: mapping records to documents is the agent's job. Each
//! connector blocks, and the agent runs it on a dedicated thread.
//!
//! Every connector implements [`Connector`]: wait for a change (pushed, or polled),
//! capture after an opaque [`Cursor`], acknowledge what the agent stored, and write
//! merged records back with an [`OpOutcome`] per op. The native types
//! ([`CaptureBatch`], [`RowState`], [`WriteOp`], [`FieldType`]) are the same for
//! every kind of tool.
//!
//! Architecture Invariant: a connector never writes over an edit the agent has not
//! captured: an op whose record changed in the tool since the capture it was planned
//! from is refused as stale, record by record.
//!
//! # Example
//!
//! A user's tool inserts a customer; the connector captures it and writes a change
//! back without echoing it into its own capture.
//!
//! ```
//! use connectors::sqlite::{CollectionSpec, OpOutcome, RowState, SqliteConnector, WriteOp};
//! use std::collections::HashSet;
//! use crdt_model::{Record, Value};
//!
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("crm.db");
//! let tool = rusqlite::Connection::open(&path)?;
//! tool.execute_batch("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT);")?;
//!
//! let spec = CollectionSpec {
//!     collection: "customers".into(),
//!     table: "customers".into(),
//!     primary_key: "id".into(),
//!     columns: vec!["name".into()],
//! };
//! let mut connector = SqliteConnector::open(&path, vec![spec])?;
//!
//! tool.execute("INSERT INTO customers (id, name) VALUES (7, 'Ada')", [])?;
//! assert!(connector.changed()?);
//! let batch = connector.capture(0, u64::MAX, 100)?;
//! let expected = Record::from([("name".to_owned(), Value::Text("Ada".into()))]);
//! assert_eq!(batch.changes[0].key, "7");
//! assert_eq!(batch.changes[0].state, RowState::Present(expected));
//! connector.trim_outbox(batch.cursor)?;
//!
//! let rename = WriteOp::Upsert {
//!     collection: "customers".into(),
//!     key: "7".into(),
//!     fields: Record::from([("name".to_owned(), Value::Text("Ada L.".into()))]),
//! };
//! let outcomes = connector.write_back(batch.cursor, &HashSet::new(), &[rename])?;
//! assert_eq!(outcomes, [OpOutcome::WRITTEN]);
//! assert_eq!(connector.outbox_len()?, 0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod caldav;
mod contract;
pub mod csv;
pub mod postgres;
pub mod rest;
mod shadow;
pub mod sqlite;
mod values;

pub use contract::{
    BULK_WRITES_PER_PLAN, CaptureBatch, CapturedChange, ChangeFeed, CollectionSpec, Connector,
    ConnectorError, Cursor, FieldType, InvalidValue, OpOutcome, RecordKey, Rejection, RowState,
    TableSchema, WRITES_PER_PLAN, Wake, WriteOp,
};
