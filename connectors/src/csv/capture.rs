//! Capture: a file read whole and diffed against the shadow by key, queued, and
//! reported up to a batch's maximum, each record once per batch.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use crdt_model::Record;

use super::file::{self, Row, Sheet, Stat};
use super::{Columns, CsvConnector, CsvError, Found, Queue, Seen, Table, sequence};
use crate::contract::{CaptureBatch, CapturedChange, Cursor, InvalidValue, RowState};
use crate::shadow::{Body, Shadow};
use crate::values::{from_text, shorten};

impl CsvConnector {
    /// Reads table `t` if it may have changed, queueing what changed.
    fn look(&mut self, t: usize) -> Result<(), CsvError> {
        let table = &mut self.tables[t];
        table.track.event |= table.dirty.swap(false, Ordering::AcqRel);
        let stat = Stat::of(&table.path).map_err(|e| table.io(e))?;
        let Some(stat) = stat else {
            return Err(CsvError::MissingFile {
                file: table.name.clone(),
            });
        };
        let track = &mut table.track;
        if track.queue.as_ref().is_some_and(|q| q.seen.stat == stat) {
            return Ok(());
        }
        track.queue = None;
        if !track.unsettled && !track.event && track.seen.is_some_and(|s| s.stat == stat && !s.racy)
        {
            return Ok(());
        }
        let bytes = file::read(&table.path, &table.name)?;
        let seen = Seen::new(stat, &bytes);
        if track.seen.is_some_and(|s| s.digest == seen.digest) {
            // Touched, or an event, but the content is the one captured.
            track.seen = Some(seen);
            track.event = false;
            track.unsettled = false;
            return Ok(());
        }
        match table.changes(&self.shadow, bytes, stat, self.debounce) {
            Ok(Some(found)) => {
                let track = &mut table.track;
                track.queue = Some(Queue {
                    seen,
                    found: found.into(),
                });
                track.unsettled = false;
                track.event = false;
            }
            Ok(None) => table.track.unsettled = true,
            Err(e) if e.unsettled() => {
                if table.track.warned == Some(stat) {
                    tracing::debug!(file = %table.name, error = %e, "the file still does not read as CSV");
                } else {
                    tracing::warn!(file = %table.name, error = %e, "the file does not read as CSV now; it is read again later");
                    table.track.warned = Some(stat);
                }
                table.track.unsettled = true;
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Captures up to `max` changes after sequence `after`.
    pub(super) fn capture_after(
        &mut self,
        after: &Cursor,
        max: usize,
    ) -> Result<CaptureBatch, CsvError> {
        let after_seq = sequence(after)?;
        let rescan = self.rescan;
        for t in 0..self.tables.len() {
            self.look(t)?;
        }
        let (changes, staged) = self.take(max);
        debug_assert!(
            changes.len() <= max,
            "a capture reports at most `max` changes"
        );
        if rescan
            && self
                .tables
                .iter()
                .all(|t| t.track.queue.is_none() && !t.track.unsettled)
        {
            self.rescan = false;
        }
        if changes.is_empty() {
            return Ok(CaptureBatch {
                changes,
                cursor: after.clone(),
                rescan: false,
            });
        }
        let seq = self.shadow.next_seq(after_seq);
        debug_assert!(seq > after_seq, "the cursor moves forward");
        self.shadow.stage(seq, staged);
        Ok(CaptureBatch {
            changes,
            cursor: Cursor(seq.to_be_bytes().to_vec()),
            rescan,
        })
    }

    /// Takes up to `max` queued changes, each record once, with what to stage of
    /// them; remembers the invalid rows reported.
    fn take(&mut self, max: usize) -> (Vec<CapturedChange>, Vec<(String, String, Body)>) {
        let mut changes = Vec::new();
        let mut staged = Vec::new();
        for table in &mut self.tables {
            let track = &mut table.track;
            let Some(queue) = track.queue.as_mut() else {
                continue;
            };
            let mut keys = HashSet::new();
            let mut full = false;
            while let Some(next) = queue.found.front() {
                if changes.len() >= max || !keys.insert(next.change.key.clone()) {
                    // Full, or a record already in the batch: the rest comes next.
                    full = true;
                    break;
                }
                let Some(found) = queue.found.pop_front() else {
                    break;
                };
                let key = found.change.key.clone();
                match found.complaint {
                    Some(complaint) => track.invalid.insert(key.clone(), complaint),
                    None => track.invalid.remove(&key),
                };
                if let Some(body) = found.stage {
                    staged.push((table.collection.clone(), key, body));
                }
                changes.push(found.change);
            }
            if queue.found.is_empty() {
                track.seen = Some(queue.seen);
                track.queue = None;
            }
            if full {
                break;
            }
        }
        (changes, staged)
    }
}

impl Table {
    /// The row's record, or why a cell does not read as its declared type.
    fn record(&self, key: &str, columns: &Columns, row: &Row) -> Result<Record, Box<InvalidValue>> {
        let mut record = Record::new();
        for (name, &c) in self.columns.iter().zip(&columns.synced) {
            let kind = self.field_type(name);
            let cell = &row.cells[c];
            let value = from_text(cell, kind).map_err(|_| {
                Box::new(InvalidValue {
                    table: self.name.clone(),
                    key: shorten(key),
                    column: name.clone(),
                    found: format!("{:?} (line {})", shorten(cell), row.line),
                    expected: kind,
                    declared: format!("declared {kind} in the config"),
                })
            })?;
            record.insert(name.clone(), value);
        }
        Ok(record)
    }

    /// An invalid row about the key column.
    fn key_problem(&self, key: &str, found: String, declared: String) -> RowState {
        RowState::Invalid(InvalidValue {
            table: self.name.clone(),
            key: shorten(key),
            column: self.key.clone(),
            found,
            expected: self.key_type,
            declared,
        })
    }

    fn found(
        &self,
        key: &str,
        state: RowState,
        stage: Option<Body>,
        complaint: Option<Vec<String>>,
    ) -> Found {
        Found {
            change: CapturedChange {
                collection: self.collection.clone(),
                key: key.to_owned(),
                previous_key: None,
                state,
            },
            stage,
            complaint,
        }
    }

    /// The changes of the file `bytes` (with `stat`) against the shadow; `None`
    /// when the file looks half-written or rows are missing from a file modified
    /// less than `debounce` ago.
    fn changes(
        &self,
        shadow: &Shadow,
        bytes: Vec<u8>,
        stat: Stat,
        debounce: Duration,
    ) -> Result<Option<Vec<Found>>, CsvError> {
        let young = stat.age().is_some_and(|age| age < debounce);
        let Some(sheet) = Sheet::parse(&self.name, bytes, self.delimiter)? else {
            if young {
                tracing::warn!(file = %self.name, line = 1, "the file is empty and was just modified; it is read again later");
                return Ok(None);
            }
            return Err(CsvError::NoHeader {
                file: self.name.clone(),
            });
        };
        let columns = self.columns(&sheet.header)?;
        // Rows by key in file order: the first row of a key wins.
        let mut rows: Vec<(&str, Vec<usize>)> = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut keyless = Vec::new();
        for (i, row) in sheet.rows.iter().enumerate() {
            let key = row.cells[columns.key].as_str();
            if key.trim().is_empty() {
                keyless.push(i);
            } else if let Some(&at) = index.get(key) {
                rows[at].1.push(i);
            } else {
                index.insert(key, rows.len());
                rows.push((key, vec![i]));
            }
        }
        let mut found = Vec::new();
        let mut later = Vec::new();
        for (key, at) in &rows {
            self.row_change(shadow, &sheet, &columns, key, at, &mut found, &mut later)?;
        }
        if let Some(change) = self.keyless_change(&sheet, &keyless) {
            found.push(change);
        }
        let mut gone: Vec<String> = shadow
            .keys(&self.collection)?
            .into_iter()
            .chain(self.track.invalid.keys().filter(|k| !k.is_empty()).cloned())
            .filter(|k| !index.contains_key(k.as_str()))
            .collect();
        gone.sort();
        gone.dedup();
        if !gone.is_empty() && young {
            tracing::debug!(file = %self.name, "rows are missing from a file just modified; it is read again once it settles");
            return Ok(None);
        }
        for key in gone {
            found.push(self.found(&key, RowState::Absent, Some(None), None));
        }
        found.extend(later);
        Ok(Some(found))
    }

    /// The changes of the row with `key` (at rows `at` of the sheet, the first one
    /// synced): into `found`, or into `later` for a duplicate of a row reported now
    /// (a batch holds each record once, so it comes in the next).
    #[expect(
        clippy::too_many_arguments,
        reason = "one call site; the outputs are the caller's two lists"
    )]
    fn row_change(
        &self,
        shadow: &Shadow,
        sheet: &Sheet,
        columns: &Columns,
        key: &str,
        at: &[usize],
        found: &mut Vec<Found>,
        later: &mut Vec<Found>,
    ) -> Result<(), CsvError> {
        let row = &sheet.rows[at[0]];
        let reported = self.track.invalid.get(key);
        let record = match self.record(key, columns, row) {
            Ok(record) => record,
            Err(invalid) => {
                let mut complaint = vec!["cells".to_owned()];
                complaint.extend(columns.synced.iter().map(|&c| row.cells[c].clone()));
                if reported != Some(&complaint) {
                    let state = RowState::Invalid(*invalid);
                    found.push(self.found(key, state, None, Some(complaint)));
                }
                return Ok(());
            }
        };
        let duplicate = at.get(1..).filter(|d| !d.is_empty()).map(|others| {
            let mut complaint = vec!["duplicates".to_owned()];
            for &d in others {
                complaint.extend(sheet.rows[d].cells.iter().cloned());
            }
            let state = self.key_problem(
                key,
                format!(
                    "a second row with this key (line {})",
                    sheet.rows[others[0]].line
                ),
                format!(
                    "keys must be unique; the row on line {} is synced",
                    row.line
                ),
            );
            self.found(key, state, None, Some(complaint))
        });
        let body = self.body(columns, row);
        if shadow.get(&self.collection, key)?.as_deref() != Some(body.as_str()) {
            let state = RowState::Present(record);
            found.push(self.found(key, state, Some(Some(body)), None));
            later.extend(duplicate);
            return Ok(());
        }
        match duplicate {
            Some(duplicate) if reported != duplicate.complaint.as_ref() => found.push(duplicate),
            Some(_) => {}
            // Reported invalid before and valid now: reported again to say so.
            None if reported.is_some() => {
                let state = RowState::Present(record);
                found.push(self.found(key, state, Some(Some(body)), None));
            }
            None => {}
        }
        Ok(())
    }

    /// The rows without a key, reported once (under the empty key) until they change.
    fn keyless_change(&self, sheet: &Sheet, keyless: &[usize]) -> Option<Found> {
        let reported = self.track.invalid.get("");
        let Some(&first) = keyless.first() else {
            return reported.map(|_| self.found("", RowState::Absent, Some(None), None));
        };
        let mut complaint = vec!["no key".to_owned()];
        for &i in keyless {
            complaint.extend(sheet.rows[i].cells.iter().cloned());
        }
        if reported == Some(&complaint) {
            return None;
        }
        let line = sheet.rows[first].line;
        let state = self.key_problem(
            "",
            format!("an empty key (line {line})"),
            "every row needs a key".to_owned(),
        );
        Some(self.found("", state, None, Some(complaint)))
    }
}
