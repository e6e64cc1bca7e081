//! Native records ↔ canonical fields: how one tool's collection maps to the
//! documents, with its filter and computed fields. Pure: no IO.
//!
//! The engine reads a captured row through [`Mapping::read`] and projects a merged
//! record into the tool through [`Mapping::project`] and [`Mapping::writes`]. The
//! tool's shadow stays in the tool's own form, and a column counts as in sync when
//! the tool's value is what the document's value becomes in the tool, *or* what the
//! tool's value reads as is the document's value. So a lossy step (a text cut to a
//! column's length, an unknown enumeration value) never writes over the fuller value
//! on either side, and never loops.
//!
//! ```
//! use concord_agent::mapping::{Mapping, Projection};
//! use crdt_model::{Record, RecordState, Value};
//!
//! let mapping = Mapping::plain(&["name".to_owned()]);
//! let row = Record::from([("name".to_owned(), Value::Text("Ada".into()))]);
//! let fields = mapping.read(&row, None).expect("plain columns always read");
//! let state = RecordState { fields, ..RecordState::default() };
//! assert!(matches!(mapping.project(&state), Ok(Projection::Held(r)) if r == row));
//! ```

mod compile;
mod expr;
mod field;
mod natural_key;

use std::collections::HashMap;

use crdt_model::{Record, RecordState, Value};
use serde::{Deserialize, Serialize};

use crate::config::{FilterExit, MatchWins};
use expr::Expr;
use field::FieldMap;

pub use compile::{collection_mapping, natural_key};
pub use natural_key::NaturalKey;

/// A value the mapping cannot convert, or a computed field that cannot be computed:
/// the record becomes a dead letter for that tool, with this reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum MappingError {
    /// The tool's value of a column does not convert into its canonical field.
    #[error("column `{column}` → field `{field}`: {problem}")]
    Read {
        /// The column.
        column: String,
        /// The canonical field.
        field: String,
        /// What is wrong.
        problem: String,
    },
    /// A canonical value does not convert into the tool's column.
    #[error("field `{field}` → column `{column}`: {problem}")]
    Write {
        /// The column.
        column: String,
        /// The canonical field.
        field: String,
        /// What is wrong.
        problem: String,
    },
    /// A computed column's expression failed on this record.
    #[error("column `{column}` = {expression}: {problem}")]
    Compute {
        /// The column.
        column: String,
        /// The expression.
        expression: String,
        /// The evaluation error.
        problem: String,
    },
}

/// What a tool should hold of a merged record.
#[derive(Debug, Clone, PartialEq)]
pub enum Projection {
    /// Nothing: the record is deleted.
    Deleted,
    /// Nothing new: the record does not pass the tool's filter.
    Outside,
    /// The record, in the tool's columns (those written into the tool).
    Held(Record),
}

/// How one tool's collection maps to canonical fields.
#[derive(Debug, Clone)]
pub struct Mapping {
    fields: Vec<FieldMap>,
    by_column: HashMap<String, usize>,
    /// The columns the connector reads and writes, in configuration order.
    columns: Vec<String>,
    filter: Option<Expr>,
    on_filter_exit: FilterExit,
    on_match: MatchWins,
    /// The field map of the column holding the row's change time.
    changed_at: Option<usize>,
    /// Every column is a plain both-ways copy: the fast path.
    plain: bool,
}

impl Mapping {
    /// Columns synced as they are, each the canonical field of the same name.
    pub fn plain(columns: &[String]) -> Mapping {
        Mapping::new(
            columns.iter().map(|c| FieldMap::plain(c)).collect(),
            None,
            FilterExit::Remove,
            MatchWins::Others,
            None,
        )
    }

    fn new(
        fields: Vec<FieldMap>,
        filter: Option<Expr>,
        on_filter_exit: FilterExit,
        on_match: MatchWins,
        changed_at: Option<usize>,
    ) -> Mapping {
        let plain = fields.iter().all(|f| {
            f.steps.is_empty()
                && f.compute.is_none()
                && f.column == f.field
                && f.direction == crate::config::Direction::Both
        }) && filter.is_none();
        Mapping {
            by_column: fields
                .iter()
                .enumerate()
                .map(|(i, f)| (f.column.clone(), i))
                .collect(),
            columns: fields.iter().map(|f| f.column.clone()).collect(),
            fields,
            filter,
            on_filter_exit,
            on_match,
            changed_at,
            plain,
        }
    }

    /// The same mapping, with `on_match` deciding whose values win when the tool's
    /// record joins an existing one.
    pub fn joining(mut self, on_match: MatchWins) -> Mapping {
        self.on_match = on_match;
        self
    }

    /// The tool's columns this mapping reads and writes.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// The canonical fields read from the tool.
    pub fn fields_read(&self) -> impl Iterator<Item = &str> {
        self.fields
            .iter()
            .filter(|f| f.reads())
            .map(|f| f.field.as_str())
    }

    /// The canonical fields this mapping reads or writes (not computed ones).
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.fields
            .iter()
            .filter(|f| f.compute.is_none())
            .map(|f| f.field.as_str())
    }

    /// Each expression (the filter, computed columns) with the fields it reads.
    pub fn expressions(&self) -> impl Iterator<Item = (&str, &[String])> {
        self.filter
            .iter()
            .chain(self.fields.iter().filter_map(|f| f.compute.as_ref()))
            .map(|e| (e.source(), e.variables()))
    }

    /// What the tool does with a record that stops passing its filter.
    pub fn on_filter_exit(&self) -> FilterExit {
        self.on_filter_exit
    }

    /// Whose values win when the tool's record is first linked to an existing one.
    pub fn on_match(&self) -> MatchWins {
        self.on_match
    }

    /// The canonical fields to write for the tool's `row`: the columns that differ
    /// from `shadow` (what the tool was known to hold), or, for a new row (no
    /// shadow), every column with a value. Columns written into the tool only are
    /// never read.
    pub fn read(&self, row: &Record, shadow: Option<&Record>) -> Result<Record, MappingError> {
        let mut fields = Record::new();
        for map in self.fields.iter().filter(|f| f.reads()) {
            let value = row.get(&map.column).unwrap_or(&Value::Null);
            let unchanged = match shadow {
                Some(shadow) => shadow.get(&map.column) == Some(value),
                None => *value == Value::Null,
            };
            if unchanged {
                continue;
            }
            let canonical = if self.plain {
                value.clone()
            } else {
                map.read(value)?
            };
            fields.insert(map.field.clone(), canonical);
        }
        Ok(fields)
    }

    /// When the tool's `row` last changed, in milliseconds since the Unix epoch, if
    /// the collection names a column for it and the row has a time there.
    pub fn changed_at_ms(&self, row: &Record) -> Option<i64> {
        let map = &self.fields[self.changed_at?];
        match map.read(row.get(&map.column)?) {
            Ok(Value::Timestamp(t)) => Some(t.micros().div_euclid(1000)),
            _ => None,
        }
    }

    /// Whether the record with canonical `fields` passes the tool's filter. A filter
    /// that fails on the record (a type mismatch) does not pass it.
    pub fn passes(&self, fields: &Record) -> bool {
        let Some(filter) = &self.filter else {
            return true;
        };
        match filter.test(fields) {
            Ok(pass) => pass,
            Err(problem) => {
                tracing::warn!(filter = filter.source(), %problem, "filter failed on a record, which the tool therefore does not hold");
                false
            }
        }
    }

    /// What the tool should hold of the merged record `state`.
    pub fn project(&self, state: &RecordState) -> Result<Projection, MappingError> {
        if state.deleted {
            return Ok(Projection::Deleted);
        }
        if !self.passes(&state.fields) {
            return Ok(Projection::Outside);
        }
        let mut record = Record::new();
        for map in self.fields.iter().filter(|f| f.writes()) {
            let canonical = match &map.compute {
                Some(expr) => {
                    expr.eval(&state.fields)
                        .map_err(|problem| MappingError::Compute {
                            column: map.column.clone(),
                            expression: expr.source().to_owned(),
                            problem,
                        })?
                }
                None => state.fields.get(&map.field).cloned().unwrap_or(Value::Null),
            };
            let native = if self.plain {
                canonical
            } else {
                map.write(&canonical)?
            };
            record.insert(map.column.clone(), native);
        }
        Ok(Projection::Held(record))
    }

    /// The columns of `target` (a [`Projection::Held`] record) to write into a tool
    /// holding `held`, for a record with canonical `fields`: those not in sync. A
    /// column is in sync when the tool holds the target value, or when the tool's
    /// value reads as the canonical one (a cut text, an unknown enumeration value).
    pub fn writes(&self, target: &Record, fields: &Record, held: Option<&Record>) -> Record {
        target
            .iter()
            .filter(|(column, value)| {
                let Some(had) = held.and_then(|h| h.get(*column)) else {
                    return true;
                };
                if had == *value {
                    return false;
                }
                let Some(map) = self.by_column.get(*column).map(|&i| &self.fields[i]) else {
                    return true;
                };
                if self.plain || !map.reads() {
                    return true;
                }
                let canonical = fields.get(&map.field).unwrap_or(&Value::Null);
                map.read(had).ok().as_ref() != Some(canonical)
            })
            .map(|(column, value)| (column.clone(), value.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests;
