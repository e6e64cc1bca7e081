//! Canonical records as Automerge documents. Pure: no IO, no async runtime.
//!
//! Each record of a collection lives in its own Automerge document whose id,
//! [`DocId`], is derived from the collection and the record's identity key, so two
//! offline sites that create the same record grow one document. A local [`Edit`]
//! writes only the fields that differ; [`RecordDoc::read`] gives the merged record
//! and the values of fields edited concurrently.
//!
//! ```
//! use crdt_model::{DocId, Edit, RecordDoc, Value};
//!
//! let mut a = RecordDoc::new(&[1; 16]);
//! let mut edit = Edit::default();
//! edit.fields.insert("name".into(), Value::Text("Ada".into()));
//! let change = a.edit("customers", "42", &edit)?.expect("a new record is a change");
//!
//! let mut b = RecordDoc::new(&[2; 16]);
//! b.apply(&[change])?;
//! assert_eq!(b.read()?.fields["name"], Value::Text("Ada".into()));
//! assert_eq!(DocId::of("customers", "42"), DocId::of("customers", "42"));
//! # Ok::<(), crdt_model::ModelError>(())
//! ```

mod document;
mod provenance;
mod value;

pub use automerge::ChangeHash;
pub use document::{ActorBytes, Applied, DocId, Edit, ModelError, RecordDoc, RecordState};
pub use provenance::{Candidate, Contested, Decision, HistoryEntry, Provenance};
pub use value::{Decimal, DecimalError, Record, Timestamp, Value};
