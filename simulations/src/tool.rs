//! A simulated tool: two in-memory tables honouring the connector contract.
//!
//! `items` has shared keys (users pick them); `orders` has keys the tool assigns
//! itself, one counter per tool, so two tools hand out the same ids independently
//! and the agents must keep each tool's own (tool ids). Edits append to an outbox
//! with ever-growing sequence numbers (trimming keeps the highest); capture reads
//! entries after a cursor and up to a bound, with each row's current state; the
//! agent's writes leave no outbox entry (no echo); a write of a record the user
//! changed after the plan's capture is refused as stale, record by record; and an
//! insert is done once per token, a repeat writing its fields into the row it made,
//! exactly as the SQLite connector does.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use connectors::{
    CaptureBatch, CapturedChange, ChangeFeed, Connector, ConnectorError, Cursor, OpOutcome,
    RecordKey, Rejection, RowState, WriteOp,
};
use crdt_model::{Record, Value};

/// The collection with shared keys.
pub const COLLECTION: &str = "items";
/// The collection whose keys the tool assigns.
pub const ORDERS: &str = "orders";
/// Both collections.
pub const COLLECTIONS: [&str; 2] = [COLLECTION, ORDERS];
/// Its columns.
pub const COLUMNS: [&str; 3] = ["name", "qty", "note"];

/// A simulated tool's table, outbox and counters. It is the tool's own storage, so
/// it survives a crash of its agent.
#[derive(Debug, Default, Clone)]
pub struct SimTool {
    /// The rows of `items`, by key.
    pub rows: BTreeMap<String, Record>,
    /// The rows of `orders`, by the key the tool assigned.
    pub orders: BTreeMap<String, Record>,
    /// The last key assigned in `orders`.
    last_order: u64,
    /// Keys of the rows inserted by the agent, by insert token.
    inserted: BTreeMap<String, String>,
    /// Orders the simulated user created.
    pub orders_created: u64,
    /// Changed records: (collection, key) by seq.
    outbox: BTreeMap<u64, (&'static str, String)>,
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
    /// The user sets `fields` of item `key` (creating it with the others empty), or
    /// deletes it with `None`.
    pub fn user_edit(&mut self, key: &str, fields: Option<Record>) {
        self.user_edit_in(COLLECTION, key, fields);
    }

    /// The user sets `fields` of the row `key` of `collection` (creating it with the
    /// others empty), or deletes it with `None`.
    pub fn user_edit_in(&mut self, collection: &'static str, key: &str, fields: Option<Record>) {
        let table = self.table_mut(collection);
        match fields {
            Some(fields) => {
                let row = table.entry(key.to_owned()).or_insert_with(empty_row);
                row.extend(fields);
            }
            None => {
                if table.remove(key).is_none() {
                    return;
                }
            }
        }
        self.head += 1;
        self.outbox.insert(self.head, (collection, key.to_owned()));
        self.edits += 1;
    }

    /// The user creates an order; the tool gives it its next key, which it returns.
    pub fn user_insert_order(&mut self, fields: Record) -> String {
        self.last_order += 1;
        let key = self.last_order.to_string();
        self.orders_created += 1;
        self.user_edit_in(ORDERS, &key, Some(fields));
        key
    }

    fn table_mut(&mut self, collection: &str) -> &mut BTreeMap<String, Record> {
        if collection == ORDERS {
            &mut self.orders
        } else {
            &mut self.rows
        }
    }

    fn table(&self, collection: &str) -> &BTreeMap<String, Record> {
        if collection == ORDERS {
            &self.orders
        } else {
            &self.rows
        }
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
        for (&seq, (collection, key)) in self.outbox.range(after + 1..=upto).take(max) {
            batch.cursor = cursor_of(seq);
            if !seen.insert((*collection, key.clone())) {
                continue;
            }
            let state = match self.table(collection).get(key) {
                Some(row) => RowState::Present(row.clone()),
                None => RowState::Absent,
            };
            batch.changes.push(CapturedChange {
                collection: (*collection).to_owned(),
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
                for collection in COLLECTIONS {
                    let keys: Vec<String> = self.table(collection).keys().cloned().collect();
                    for key in keys {
                        self.head += 1;
                        self.outbox.insert(self.head, (collection, key));
                    }
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
        let uncaptured: HashSet<(String, String)> = self
            .outbox
            .range(captured_upto + 1..)
            .map(|(_, (collection, key))| ((*collection).to_owned(), key.clone()))
            .collect();
        let mut outcomes = Vec::with_capacity(ops.len());
        for op in ops {
            let collection = op.collection().to_owned();
            if !COLLECTIONS.contains(&collection.as_str()) {
                outcomes.push(OpOutcome::Rejected(Rejection::UnknownCollection {
                    collection,
                }));
                continue;
            }
            if let WriteOp::Insert { token, fields, .. } = op {
                outcomes.push(self.insert(&collection, token, fields));
                continue;
            }
            let Some(key) = op.key().map(str::to_owned) else {
                continue;
            };
            let record = (collection.clone(), key.clone());
            if uncaptured.contains(&record) || changed_since.contains(&record) {
                outcomes.push(OpOutcome::Stale);
                continue;
            }
            let table = self.table_mut(&collection);
            match op {
                WriteOp::Upsert { fields, .. } => {
                    let row = table.entry(key).or_insert_with(empty_row);
                    row.extend(fields.clone());
                }
                WriteOp::Delete { .. } => {
                    table.remove(&key);
                }
                WriteOp::Insert { .. } => unreachable!("inserts are handled above"),
            }
            self.writes += 1;
            outcomes.push(OpOutcome::WRITTEN);
        }
        outcomes
    }

    /// Inserts a row whose key the tool assigns, once per token: a repeat writes its
    /// fields into the row the first one made, if it still exists.
    fn insert(&mut self, collection: &str, token: &str, fields: &Record) -> OpOutcome {
        if collection != ORDERS {
            return OpOutcome::Rejected(Rejection::KeyNotAssigned {
                table: collection.to_owned(),
                column: "key".to_owned(),
            });
        }
        // A token whose row is gone (the record left the tool and came back)
        // inserts anew, as the connectors do.
        let done = self
            .inserted
            .get(token)
            .filter(|key| self.orders.contains_key(*key));
        let key = match done {
            Some(key) => key.clone(),
            None => {
                self.last_order += 1;
                let key = self.last_order.to_string();
                self.inserted.insert(token.to_owned(), key.clone());
                self.orders.insert(key.clone(), empty_row());
                key
            }
        };
        if let Some(row) = self.orders.get_mut(&key) {
            row.extend(fields.clone());
        }
        self.writes += 1;
        OpOutcome::Written {
            key: Some(key),
            version: None,
        }
    }
}

/// The simulated tool under the same contract as every connector: the simulator's
/// tool loop drives it exactly as the agent's tool thread drives SQLite.
impl Connector for SimTool {
    fn kind(&self) -> &'static str {
        "simulated"
    }

    fn assigns_keys(&self, collection: &str) -> bool {
        collection == ORDERS
    }

    /// The simulated tool keeps values of any type in any column: it has no schema.
    fn field_types(&self, _collection: &str) -> Option<&BTreeMap<String, connectors::FieldType>> {
        None
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
