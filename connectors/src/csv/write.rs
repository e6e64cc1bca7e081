//! Write-back: ops planned against the file as it is now (stale when a row changed
//! since its capture), applied to its rows, and the file replaced whole.

use std::collections::{HashMap, HashSet};

use crdt_model::Record;

use super::file::{self, ReplaceError, Row, Sheet, Stat};
use super::{Columns, CsvConnector, CsvError, Seen, Table, WRITE_ATTEMPTS_MAX, digest};
use crate::contract::{FieldType, OpOutcome, RecordKey, Rejection, WriteOp};
use crate::shadow::Shadow;
use crate::values::{from_text, key_text, shorten, to_text};

impl CsvConnector {
    /// Applies the ops `indices` of `ops`, all for table `t`, setting their outcomes.
    pub(super) fn write_table(
        &mut self,
        t: usize,
        ops: &[WriteOp],
        indices: &[usize],
        changed_since: &HashSet<RecordKey>,
        outcomes: &mut [Option<OpOutcome>],
    ) -> Result<(), CsvError> {
        for _ in 0..WRITE_ATTEMPTS_MAX {
            let table = &self.tables[t];
            let Some(write) = table.write(&self.shadow, ops, indices, changed_since)? else {
                continue;
            };
            self.wrote(t, &write)?;
            for (i, plan) in write.plans {
                outcomes[i] = Some(match plan {
                    Plan::Done(outcome) => outcome,
                    Plan::Upsert { .. } | Plan::Delete { .. } => OpOutcome::WRITTEN,
                });
            }
            return Ok(());
        }
        Err(CsvError::KeptChanging {
            file: self.tables[t].name.clone(),
            attempts: WRITE_ATTEMPTS_MAX,
        })
    }

    /// Records what a write of table `t` did: the rows written, durable in the
    /// shadow, and the file's new stat, so that its echo is no change.
    fn wrote(&mut self, t: usize, write: &Write) -> Result<(), CsvError> {
        let table = &mut self.tables[t];
        let now = Stat::of(&table.path).map_err(|e| table.io(e))?;
        let written: Vec<_> = write
            .written
            .iter()
            .map(|(key, body)| (table.collection.clone(), key.clone(), body.clone()))
            .collect();
        self.shadow.written(&written, &[])?;
        let track = &mut table.track;
        for (key, _) in &write.written {
            track.invalid.remove(key);
        }
        let captured_whole = track.queue.is_none()
            && !track.unsettled
            && track
                .seen
                .is_some_and(|s| s.digest == digest(&write.before));
        if captured_whole && let Some(stat) = now {
            // The file is what was captured plus what was written.
            track.seen = Some(Seen::new(stat, &write.after));
        }
        track.written = now;
        Ok(())
    }
}

/// One write of a file: the bytes before and after, what each op did, and the rows
/// written (key and new body, `None`: deleted), in op order.
#[derive(Debug)]
struct Write {
    before: Vec<u8>,
    after: Vec<u8>,
    plans: Vec<(usize, Plan)>,
    written: Vec<(String, Option<String>)>,
}

/// What a write-back does with one op.
#[derive(Debug)]
enum Plan {
    /// Nothing to write: the op's outcome.
    Done(OpOutcome),
    /// Sets cells (column index, text) of the row with `key`, appending it if
    /// missing.
    Upsert {
        key: String,
        cells: Vec<(usize, String)>,
    },
    /// Removes the rows with `key`.
    Delete { key: String },
}

impl Table {
    /// Writes the ops `indices` of `ops` into the file as it is now; `None` when the
    /// file was saved meanwhile (nothing written: try again).
    fn write(
        &self,
        shadow: &Shadow,
        ops: &[WriteOp],
        indices: &[usize],
        changed_since: &HashSet<RecordKey>,
    ) -> Result<Option<Write>, CsvError> {
        self.check_unlocked()?;
        if Stat::of(&self.path).map_err(|e| self.io(e))?.is_none() {
            return Err(CsvError::MissingFile {
                file: self.name.clone(),
            });
        }
        let before = file::read(&self.path, &self.name)?;
        let mut sheet =
            Sheet::parse(&self.name, before.clone(), self.delimiter)?.ok_or_else(|| {
                CsvError::NoHeader {
                    file: self.name.clone(),
                }
            })?;
        let columns = self.columns(&sheet.header)?;
        let mut plans = Vec::with_capacity(indices.len());
        for &i in indices {
            let plan = self.plan(shadow, &sheet, &columns, &ops[i], changed_since)?;
            plans.push((i, plan));
        }
        let written = self.apply(&mut sheet, &columns, &plans);
        let after = sheet.to_bytes();
        self.check_reads_back(&sheet, &after)?;
        if after != before {
            self.check_unlocked()?;
            match file::replace(&self.path, &before, &after) {
                Ok(()) => {}
                Err(ReplaceError::Changed) => return Ok(None),
                Err(ReplaceError::Io(e)) => return Err(self.io(e)),
            }
        }
        Ok(Some(Write {
            before,
            after,
            plans,
            written,
        }))
    }

    /// A spreadsheet program's lock file next to the file is an error.
    pub(super) fn check_unlocked(&self) -> Result<(), CsvError> {
        match file::lock_file(&self.path) {
            Some(lock) => Err(CsvError::Locked {
                file: self.name.clone(),
                lock: lock
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            }),
            None => Ok(()),
        }
    }

    /// What to do with `op` on the file as read now (`sheet`).
    fn plan(
        &self,
        shadow: &Shadow,
        sheet: &Sheet,
        columns: &Columns,
        op: &WriteOp,
        changed_since: &HashSet<RecordKey>,
    ) -> Result<Plan, CsvError> {
        let (key, cells) = match op {
            WriteOp::Upsert { key, fields, .. } => match self.cells(key, columns, fields) {
                Ok(cells) => (key, Some(cells)),
                Err(rejection) => return Ok(Plan::Done(OpOutcome::Rejected(rejection))),
            },
            WriteOp::Delete { key, .. } => (key, None),
            WriteOp::Insert { .. } => return Ok(Plan::Done(self.insert_outcome())),
        };
        if let Err(rejection) = self.check_key(key) {
            return Ok(Plan::Done(OpOutcome::Rejected(rejection)));
        }
        if changed_since.contains(&(self.collection.clone(), key.clone())) {
            return Ok(Plan::Done(OpOutcome::Stale));
        }
        let now = sheet
            .rows
            .iter()
            .find(|row| row.cells[columns.key] == *key)
            .map(|row| self.body(columns, row));
        if now != shadow.get(&self.collection, key)? {
            // Edited since the capture: the edit is captured next, then merged.
            return Ok(Plan::Done(OpOutcome::Stale));
        }
        Ok(match cells {
            Some(cells) => Plan::Upsert {
                key: key.clone(),
                cells,
            },
            None => Plan::Delete { key: key.clone() },
        })
    }

    /// An insert cannot be written: the file does not assign keys.
    pub(super) fn insert_outcome(&self) -> OpOutcome {
        OpOutcome::Rejected(Rejection::KeyNotAssigned {
            table: self.name.clone(),
            column: self.key.clone(),
        })
    }

    /// A key a row can have: not empty, and of the key column's declared type.
    fn check_key(&self, key: &str) -> Result<(), Rejection> {
        if key.trim().is_empty() {
            return Err(Rejection::ValueDoesNotFit {
                table: self.name.clone(),
                key: String::new(),
                column: self.key.clone(),
                problem: "is empty, and every row needs a key".to_owned(),
            });
        }
        match from_text(key, self.key_type) {
            Ok(_) => Ok(()),
            Err(_) if self.key_type == FieldType::Integer => Err(Rejection::KeyNotInteger {
                table: self.name.clone(),
                key: shorten(key),
                column: self.key.clone(),
                declared: "declared integer in the config".to_owned(),
            }),
            Err(problem) => Err(Rejection::ValueDoesNotFit {
                table: self.name.clone(),
                key: shorten(key),
                column: self.key.clone(),
                problem,
            }),
        }
    }

    /// The cells an upsert of `fields` sets: (column index, text).
    fn cells(
        &self,
        key: &str,
        columns: &Columns,
        fields: &Record,
    ) -> Result<Vec<(usize, String)>, Rejection> {
        let mut cells = Vec::with_capacity(fields.len());
        for (field, value) in fields {
            if *field == self.key {
                if key_text(value).as_deref() != Some(key) {
                    return Err(Rejection::KeyFieldMismatch {
                        table: self.name.clone(),
                        key: shorten(key),
                        field: field.clone(),
                        value: shorten(&value.to_string()),
                    });
                }
                continue;
            }
            let Some(at) = self.columns.iter().position(|c| c == field) else {
                return Err(Rejection::UnknownColumn {
                    table: self.name.clone(),
                    key: shorten(key),
                    field: field.clone(),
                });
            };
            let text = to_text(value);
            let kind = self.field_type(field);
            if let Err(problem) = from_text(&text, kind) {
                return Err(Rejection::ValueDoesNotFit {
                    table: self.name.clone(),
                    key: shorten(key),
                    column: field.clone(),
                    problem: format!("is declared {kind} in the config, but the value {problem}"),
                });
            }
            cells.push((columns.synced[at], text));
        }
        Ok(cells)
    }

    /// Applies the planned upserts and deletes to `sheet`; returns each written key
    /// with its new body (`None`: deleted), in op order.
    fn apply(
        &self,
        sheet: &mut Sheet,
        columns: &Columns,
        plans: &[(usize, Plan)],
    ) -> Vec<(String, Option<String>)> {
        let mut rows: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, row) in sheet.rows.iter().enumerate() {
            rows.entry(row.cells[columns.key].clone())
                .or_default()
                .push(i);
        }
        let mut written = Vec::new();
        for (_, plan) in plans {
            match plan {
                Plan::Done(_) => {}
                Plan::Upsert { key, cells } => {
                    let at = rows.entry(key.clone()).or_default();
                    let i = match at.first() {
                        Some(&i) => i,
                        None => {
                            let mut row = Row::new(sheet.header.len());
                            row.set(columns.key, key.clone());
                            sheet.rows.push(row);
                            at.push(sheet.rows.len() - 1);
                            sheet.rows.len() - 1
                        }
                    };
                    let row = &mut sheet.rows[i];
                    for (c, text) in cells {
                        row.set(*c, text.clone());
                    }
                    written.push((key.clone(), Some(self.body(columns, row))));
                }
                Plan::Delete { key } => {
                    for i in rows.remove(key).unwrap_or_default() {
                        sheet.rows[i].deleted = true;
                    }
                    written.push((key.clone(), None));
                }
            }
        }
        written
    }

    /// The bytes about to be written read back as the sheet's header and rows.
    fn check_reads_back(&self, sheet: &Sheet, bytes: &[u8]) -> Result<(), CsvError> {
        let unwritable = || CsvError::Unwritable {
            file: self.name.clone(),
        };
        let back = Sheet::parse(&self.name, bytes.to_vec(), Some(sheet.format.delimiter))
            .map_err(|_| unwritable())?
            .ok_or_else(unwritable)?;
        let meant = sheet.rows.iter().filter(|r| !r.deleted).map(|r| &r.cells);
        if back.header != sheet.header || !back.rows.iter().map(|r| &r.cells).eq(meant) {
            return Err(unwritable());
        }
        Ok(())
    }
}
