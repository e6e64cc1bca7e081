//! A simulated tool: an in-memory table honouring the SQLite connector's contract.
//!
//! Its edits append to an outbox with ever-growing sequence numbers (trimming keeps
//! the highest); capture reads entries after a cursor and up to a bound, with each
//! row's current state; the agent's writes leave no outbox entry (no echo); and a
//! write of a record the user changed after the plan's capture is refused as stale,
//! record by record, exactly as the SQLite connector does with its outbox.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use connectors::{
    CaptureBatch, CapturedChange, ChangeFeed, Connector, ConnectorError, Cursor, OpOutcome,
    RecordKey, Rejection, RowState, WriteOp,
};
use crdt_model::{Record, Value};

/// The one collection simulated.
pub const COLLECTION: &str = "items";
/// Its columns.
pub const COLUMNS: [&str; 3] = ["name", "qty", "note"];

/// A simulated tool's table, outbox and counters. It is the tool's own storage, so
/// it survives a crash of its agent.
#[derive(Debug, Default, Clone)]
pub struct SimTool {
    /// The rows, by key.
    pub rows: BTreeMap<String, Record>,
    outbox: BTreeMap<u64, String>,
    head: u64,
    /// Rows written by the agent (insert, update or delete), for the quiet check.
    pub writes: u64,
    /// Edits made by the simulated user.
    pub edits: u64,
    owner: Option<[u8; 16]>,
    rescan_upto: u64,
    /// The head at the last [`Connector::changed`].
    seen_head: u64,
    trimmed: u64,
}

/// Outbox entries acknowledged before a trim (as the SQLite connector).
const TRIM_EVERY: u64 = 256;

/// The outbox seq of a cursor (8 bytes big-endian; empty is 0).
pub fn seq(cursor: &Cursor) -> u64 {
    cursor
        .as_bytes()
        .try_into()
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

fn cursor_of(seq: u64) -> Cursor {
    Cursor(seq.to_be_bytes().to_vec())
}

fn empty_row() -> Record {
    COLUMNS
        .iter()
        .map(|c| ((*c).to_owned(), Value::Null))
        .collect()
}

impl SimTool {
    /// The user sets `fields` of row `key` (creating it with the others empty), or
    /// deletes it with `None`.
    pub fn user_edit(&mut self, key: &str, fields: Option<Record>) {
        match fields {
            Some(fields) => {
                let row = self.rows.entry(key.to_owned()).or_insert_with(empty_row);
                row.extend(fields);
            }
            None => {
                if self.rows.remove(key).is_none() {
                    return;
                }
            }
        }
        self.head += 1;
        self.outbox.insert(self.head, key.to_owned());
        self.edits += 1;
    }

    /// Whether the user committed since `cursor` (what `PRAGMA data_version` tells).
    pub fn changed_since(&self, cursor: u64) -> bool {
        self.head > cursor
    }

    /// The highest outbox seq ever given out.
    pub fn head(&self) -> u64 {
        self.head
    }

    /// Whether outbox entries up to `cursor` belong to a rescan.
    pub fn rescanning(&self, cursor: &Cursor) -> bool {
        seq(cursor) < self.rescan_upto
    }

    /// Reads up to `max` outbox entries after `after`, never across the end of a
    /// rescan, with each row's current state.
    fn read(&self, after: u64, max: usize) -> CaptureBatch {
        let rescan = after < self.rescan_upto;
        let upto = if rescan { self.rescan_upto } else { u64::MAX };
        let mut batch = CaptureBatch {
            changes: Vec::new(),
            cursor: cursor_of(after),
            rescan,
        };
        let mut seen = BTreeSet::new();
        for (&seq, key) in self.outbox.range(after + 1..=upto).take(max) {
            batch.cursor = cursor_of(seq);
            if !seen.insert(key.clone()) {
                continue;
            }
            let state = match self.rows.get(key) {
                Some(row) => RowState::Present(row.clone()),
                None => RowState::Absent,
            };
            batch.changes.push(CapturedChange {
                collection: COLLECTION.to_owned(),
                key: key.clone(),
                previous_key: None,
                state,
            });
        }
        batch
    }

    /// Records the store capturing this tool; a new store makes every row queued
    /// again. Returns the end of the rescan entries (as `SqliteConnector::claim`).
    fn claim_store(&mut self, store: [u8; 16]) -> u64 {
        match self.owner {
            Some(owner) if owner == store => {}
            None => {}
            Some(_) => {
                let keys: Vec<String> = self.rows.keys().cloned().collect();
                for key in keys {
                    self.head += 1;
                    self.outbox.insert(self.head, key);
                }
                self.rescan_upto = self.head;
            }
        }
        self.owner = Some(store);
        self.rescan_upto
    }

    /// Drops outbox entries up to `upto`; the head is kept.
    fn trim(&mut self, upto: u64) {
        self.outbox = self.outbox.split_off(&(upto + 1));
    }

    /// Applies the agent's writes, each unless its record changed after
    /// `captured_upto` (an outbox entry after it, or named in `changed_since`).
    fn apply(
        &mut self,
        captured_upto: u64,
        changed_since: &HashSet<(String, String)>,
        ops: &[WriteOp],
    ) -> Vec<OpOutcome> {
        let uncaptured: HashSet<&String> = self
            .outbox
            .range(captured_upto + 1..)
            .map(|(_, key)| key)
            .collect();
        let mut outcomes = Vec::with_capacity(ops.len());
        for op in ops {
            let Some(key) = op.key().map(str::to_owned) else {
                // Its keys are shared: the simulated table assigns none.
                outcomes.push(OpOutcome::Rejected(Rejection::KeyNotAssigned {
                    table: COLLECTION.to_owned(),
                    column: "key".to_owned(),
                }));
                continue;
            };
            let key = &key;
            if uncaptured.contains(key)
                || changed_since.contains(&(COLLECTION.to_owned(), key.clone()))
            {
                outcomes.push(OpOutcome::Stale);
                continue;
            }
            match op {
                WriteOp::Upsert { key, fields, .. } => {
                    let row = self.rows.entry(key.clone()).or_insert_with(empty_row);
                    row.extend(fields.clone());
                }
                WriteOp::Delete { key, .. } => {
                    self.rows.remove(key);
                }
                WriteOp::Insert { .. } => unreachable!("inserts are rejected above"),
            }
            self.writes += 1;
            outcomes.push(OpOutcome::WRITTEN);
        }
        outcomes
    }
}

/// The simulated tool under the same contract as every connector: the simulator's
/// tool loop drives it exactly as the agent's tool thread drives SQLite.
impl Connector for SimTool {
    fn kind(&self) -> &'static str {
        "simulated"
    }

    fn assigns_keys(&self, _collection: &str) -> bool {
        false
    }

    fn change_feed(&self) -> ChangeFeed {
        ChangeFeed::Poll {
            interval: std::time::Duration::from_millis(1),
            idle: std::time::Duration::from_millis(1),
        }
    }

    fn claim(&mut self, store: &[u8]) -> Result<(), ConnectorError> {
        let store: [u8; 16] = store
            .try_into()
            .map_err(|_| ConnectorError("a store id has 16 bytes".into()))?;
        self.claim_store(store);
        Ok(())
    }

    fn changed(&mut self) -> Result<bool, ConnectorError> {
        let changed = self.head != self.seen_head;
        self.seen_head = self.head;
        Ok(changed)
    }

    fn capture(&mut self, after: &Cursor, max: usize) -> Result<CaptureBatch, ConnectorError> {
        Ok(self.read(seq(after), max))
    }

    fn acknowledge(&mut self, durable: &Cursor) -> Result<(), ConnectorError> {
        let upto = seq(durable);
        if upto > self.trimmed && (upto - self.trimmed >= TRIM_EVERY || upto == self.head) {
            self.trim(upto);
            self.trimmed = upto;
        }
        Ok(())
    }

    fn write_back(
        &mut self,
        captured: &Cursor,
        changed_since: &HashSet<RecordKey>,
        ops: &[WriteOp],
    ) -> Result<Vec<OpOutcome>, ConnectorError> {
        Ok(self.apply(seq(captured), changed_since, ops))
    }
}
