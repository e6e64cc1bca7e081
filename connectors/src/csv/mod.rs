//! The CSV connector: one collection per CSV file in a folder, one record per row,
//! keyed by a key column.
//!
//! A file cannot say what changed, so capture reads it whole and diffs its rows
//! against the connector's shadow, what was last captured or
//! written of each row (its synced cells as a JSON object of column → text). The
//! cursor is the shadow's capture sequence number; a capture's view becomes durable
//! when the agent acknowledges it. Changes are pushed: the folder is watched, and a
//! file event wakes the agent once the file has been quiet for the debounce time.
//!
//! A file caught half-written (a quoted field not closed, a row short of fields,
//! bytes that are not UTF-8, an empty file just modified) is not a change: the
//! capture reports nothing of it, logs why, and tries again later. Rows missing from
//! a file modified less than the debounce time ago wait until it settles, so a file
//! being written is never read as rows deleted.
//!
//! Write-back reads the file afresh, refuses as stale every op whose row changed
//! since it was captured, applies the others, and replaces the file by a rename of a
//! temporary file in the same folder, once it has checked that nobody saved the file
//! meanwhile. Nothing is written while a spreadsheet program holds the file open
//! (its lock file is next to it). The file keeps its format: rows not written keep
//! their bytes, and written ones follow the file's delimiter, quoting, line ending,
//! BOM and final line break. Only UTF-8 files are read.
//!
//! Architecture Invariant: rows are inferred deleted only from a file that read
//! whole as CSV and has not been modified within the debounce time.
//!
//! Code map: `file` reads and writes the file format, `capture` diffs a file
//! against the shadow, `write` writes ops back, `watch` watches the folders.

mod capture;
mod file;
mod watch;
mod write;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::contract::{
    CaptureBatch, CapturedChange, ChangeFeed, CollectionSpec, Connector, ConnectorError, Cursor,
    FieldType, OpOutcome, RecordKey, Rejection, TableSchema, Wake, WriteOp,
};
use crate::shadow::{Body, Shadow, ShadowError};
use file::{Format, ReplaceError, Row, Sheet, Stat};

/// How long a file must be quiet after an event before it is captured, by default.
pub const DEBOUNCE_DEFAULT: Duration = Duration::from_millis(300);

/// How often files are looked at even without an event, by default.
pub const POLL_INTERVAL_DEFAULT: Duration = Duration::from_secs(5);

/// How long after a file's modification its stat cannot tell a later edit apart
/// (same length, same modification time: file systems keep times to a clock tick,
/// FAT to 2 seconds). A file read sooner is read again, and compared by digest.
const STAT_RESOLUTION_MAX: Duration = Duration::from_secs(2);

/// Times a write-back reads a file again because it was saved meanwhile, before it
/// gives up until the next write-back.
const WRITE_ATTEMPTS_MAX: usize = 3;

/// The connector's settings.
#[derive(Debug, Clone)]
pub struct CsvConfig {
    /// The folder holding the files.
    pub folder: PathBuf,
    /// The connector's own state file (what it last captured of each row).
    pub state: PathBuf,
    /// How long a file must be quiet after an event before it is captured
    /// ([`DEBOUNCE_DEFAULT`]).
    pub debounce: Duration,
    /// How often files are looked at even without an event
    /// ([`POLL_INTERVAL_DEFAULT`]).
    pub poll_interval: Duration,
}

/// One synced file.
#[derive(Debug, Clone)]
pub struct CsvCollection {
    /// The collection: `table` is the file's name in the folder (or an absolute
    /// path), `primary_key` the key column, `columns` the synced columns.
    pub spec: CollectionSpec,
    /// The declared type of columns; a column not listed is text.
    pub types: BTreeMap<String, FieldType>,
    /// The field delimiter; `None` detects it from the header line (the most
    /// frequent of `,` `;` TAB `|`, else `,`).
    pub delimiter: Option<u8>,
}

/// Why the CSV connector could not open, capture or write a file. Each names the
/// file, and the line where one applies.
#[derive(Debug, thiserror::Error)]
pub enum CsvError {
    /// Reading or writing a file failed.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: String,
        /// What failed.
        source: std::io::Error,
    },
    /// The folder of a file does not exist.
    #[error("{file}: the folder {folder} does not exist")]
    MissingFolder {
        /// The file.
        file: String,
        /// Its folder.
        folder: String,
    },
    /// A synced file is gone from its folder.
    #[error("{file}: the file does not exist (was it moved or deleted?)")]
    MissingFile {
        /// The file.
        file: String,
    },
    /// The header lacks the key column or a synced column (renamed, or a typo in the
    /// configuration).
    #[error("{file}: no column `{column}` in the header (columns: {columns})")]
    MissingColumn {
        /// The file.
        file: String,
        /// The column looked for.
        column: String,
        /// The header's columns.
        columns: String,
    },
    /// The file is empty: it has no header line.
    #[error("{file}: the file is empty; it needs a header line naming its columns")]
    NoHeader {
        /// The file.
        file: String,
    },
    /// The file is not UTF-8.
    #[error("{file}: byte {offset} (line {line}) is not UTF-8; CSV files are read as UTF-8 only")]
    NotUtf8 {
        /// The file.
        file: String,
        /// The offset of the first byte that is not UTF-8.
        offset: u64,
        /// Its line.
        line: u64,
    },
    /// A quoted field is not closed at the end of the file.
    #[error(
        "{file}: the quoted field opened on line {line} is not closed (the file may be half-written)"
    )]
    UnclosedQuote {
        /// The file.
        file: String,
        /// The line the quote opened on.
        line: u64,
    },
    /// A row has another number of fields than the header.
    #[error(
        "{file}: line {line} has {found} fields, but the header has {expected} (the file may be half-written)"
    )]
    FieldCount {
        /// The file.
        file: String,
        /// The row's line.
        line: u64,
        /// Its number of fields.
        found: u64,
        /// The header's number of fields.
        expected: u64,
    },
    /// The `csv` reader refused the file.
    #[error("{file}: line {line}: {message}")]
    Malformed {
        /// The file.
        file: String,
        /// The line.
        line: u64,
        /// The reader's message.
        message: String,
    },
    /// The file is larger than the connector reads.
    #[error("{file}: the file has {len} bytes; the CSV connector reads files of at most {max} bytes", max = file::FILE_BYTES_MAX)]
    TooLarge {
        /// The file.
        file: String,
        /// Its size.
        len: u64,
    },
    /// A spreadsheet program has the file open: nothing is written until it closes it.
    #[error(
        "{file} is locked by a spreadsheet program ({lock} exists); the write is retried once the file is closed"
    )]
    Locked {
        /// The file.
        file: String,
        /// The lock file.
        lock: String,
    },
    /// The file was saved by someone else during every attempt to write it.
    #[error(
        "{file} changed while being written, {attempts} times in a row; the write is retried later"
    )]
    KeptChanging {
        /// The file.
        file: String,
        /// The attempts made.
        attempts: usize,
    },
    /// The new content did not read back as the rows meant: nothing was written.
    #[error("{file}: the new content did not read back as written; nothing was written")]
    Unwritable {
        /// The file.
        file: String,
    },
    /// The configured delimiter cannot separate fields.
    #[error("{file}: {delimiter:?} cannot be a delimiter")]
    BadDelimiter {
        /// The file.
        file: String,
        /// The delimiter configured.
        delimiter: char,
    },
    /// Two collections sync the same file.
    #[error("{file} is configured for two collections")]
    DuplicateFile {
        /// The file.
        file: String,
    },
    /// Two collections have the same name.
    #[error("collection `{collection}` is configured twice")]
    DuplicateCollection {
        /// The collection.
        collection: String,
    },
    /// The folder cannot be watched.
    #[error("cannot watch {folder}: {message}")]
    Watch {
        /// The folder.
        folder: String,
        /// What failed.
        message: String,
    },
    /// A stored capture cursor is not a capture sequence number (8 bytes).
    #[error("the stored capture cursor has {len} bytes; a CSV cursor has 8")]
    BadCursor {
        /// Its length.
        len: usize,
    },
    /// The connector's state file failed.
    #[error("state file {path}: {message}")]
    State {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
}

impl CsvError {
    /// The file does not read as CSV now, as when caught half-written: capture
    /// tries again later.
    fn unsettled(&self) -> bool {
        matches!(
            self,
            CsvError::NotUtf8 { .. }
                | CsvError::UnclosedQuote { .. }
                | CsvError::FieldCount { .. }
                | CsvError::Malformed { .. }
        )
    }
}

impl From<CsvError> for ConnectorError {
    fn from(error: CsvError) -> ConnectorError {
        ConnectorError(Box::new(error))
    }
}

impl From<ShadowError> for CsvError {
    fn from(error: ShadowError) -> CsvError {
        CsvError::State {
            path: error.path,
            message: error.message,
        }
    }
}

/// One synced file, as configured, and what the connector knows of it.
#[derive(Debug)]
struct Table {
    collection: String,
    /// The file's name, for messages.
    name: String,
    path: PathBuf,
    key: String,
    key_type: FieldType,
    columns: Vec<String>,
    field_types: BTreeMap<String, FieldType>,
    delimiter: Option<u8>,
    /// Set by the watch when an event for the file came.
    dirty: Arc<AtomicBool>,
    track: Track,
}

/// What the connector knows of a file between captures.
#[derive(Debug, Default)]
struct Track {
    /// The file as last captured whole (or written over what was captured whole).
    seen: Option<Seen>,
    /// The file's stat after the connector last wrote it.
    written: Option<Stat>,
    /// An event came since the last capture.
    event: bool,
    /// The last look found the file half-written.
    unsettled: bool,
    /// The file version last warned about as half-written (warned once).
    warned: Option<Stat>,
    /// Changes found and not reported yet (a capture cut short by its maximum).
    queue: Option<Queue>,
    /// Rows last reported invalid, by key: what made them so. Such a row is not
    /// reported again until that changes.
    invalid: HashMap<String, Vec<String>>,
}

/// A file's content, known by stat and digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    stat: Stat,
    digest: u64,
    /// The file was modified less than [`STAT_RESOLUTION_MAX`] before it was read:
    /// an edit since may have left its stat as it was.
    racy: bool,
}

impl Seen {
    fn new(stat: Stat, bytes: &[u8]) -> Seen {
        Seen {
            stat,
            digest: digest(bytes),
            racy: stat.age().is_none_or(|age| age < STAT_RESOLUTION_MAX),
        }
    }
}

/// Changes found in a file and not reported yet.
#[derive(Debug)]
struct Queue {
    /// The file they were found in.
    seen: Seen,
    found: VecDeque<Found>,
}

/// One change found in a file.
#[derive(Debug)]
struct Found {
    change: CapturedChange,
    /// What the capture stages in the shadow for the row (`None`: nothing).
    stage: Option<Body>,
    /// For an invalid row, what made it invalid; otherwise the row is forgotten as
    /// invalid.
    complaint: Option<Vec<String>>,
}

/// Where the key and the synced columns are in a file's header.
#[derive(Debug)]
struct Columns {
    key: usize,
    synced: Vec<usize>,
}

/// The CSV connector (see the [module](self) documentation).
pub struct CsvConnector {
    tables: Vec<Table>,
    shadow: Shadow,
    debounce: Duration,
    poll_interval: Duration,
    /// The next captures report every row, as a rescan.
    rescan: bool,
    watch: Option<watch::Watch>,
}

impl std::fmt::Debug for CsvConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CsvConnector")
            .field(
                "files",
                &self.tables.iter().map(|t| &t.name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl CsvConnector {
    /// Opens the files of `collections` in `config.folder`: a missing (or empty)
    /// file is created with a header line of the key column and the synced columns;
    /// an existing file's header must name them all. Opens the state file.
    pub fn open(
        config: &CsvConfig,
        collections: Vec<CsvCollection>,
    ) -> Result<CsvConnector, CsvError> {
        let tables = tables(config, collections)?;
        for table in &tables {
            table.prepare()?;
        }
        let shadow = Shadow::open(&config.state)?;
        Ok(CsvConnector {
            tables,
            shadow,
            debounce: config.debounce,
            poll_interval: config.poll_interval,
            rescan: false,
            watch: None,
        })
    }

    fn table_of(&self, collection: &str) -> Option<usize> {
        self.tables.iter().position(|t| t.collection == collection)
    }
}

impl Table {
    fn io(&self, source: std::io::Error) -> CsvError {
        CsvError::Io {
            file: self.name.clone(),
            source,
        }
    }

    /// Creates the file with its header line when missing or empty, or checks its
    /// header.
    fn prepare(&self) -> Result<(), CsvError> {
        let existing = match Stat::of(&self.path).map_err(|e| self.io(e))? {
            Some(_) => file::read(&self.path, &self.name)?,
            None => {
                let folder = self.path.parent().unwrap_or(Path::new("."));
                if !folder.as_os_str().is_empty() && !folder.is_dir() {
                    return Err(CsvError::MissingFolder {
                        file: self.name.clone(),
                        folder: folder.display().to_string(),
                    });
                }
                Vec::new()
            }
        };
        if let Some((header, _)) = file::read_header(&self.name, &existing, self.delimiter)? {
            return self.columns(&header).map(drop);
        }
        let mut header = vec![self.key.clone()];
        header.extend(self.columns.iter().filter(|c| **c != self.key).cloned());
        let format = Format::new(self.delimiter.unwrap_or(b','));
        let content = Sheet::empty(format, header).to_bytes();
        match file::replace(&self.path, &existing, &content) {
            Ok(()) => Ok(()),
            Err(ReplaceError::Changed) => Err(CsvError::KeptChanging {
                file: self.name.clone(),
                attempts: 1,
            }),
            Err(ReplaceError::Io(e)) => Err(self.io(e)),
        }
    }

    /// Where the key and each synced column are in `header`; a column missing is an
    /// error naming the header's columns.
    fn columns(&self, header: &[String]) -> Result<Columns, CsvError> {
        let find = |column: &str| {
            header
                .iter()
                .position(|h| h == column)
                .ok_or_else(|| CsvError::MissingColumn {
                    file: self.name.clone(),
                    column: column.to_owned(),
                    columns: header.join(", "),
                })
        };
        Ok(Columns {
            key: find(&self.key)?,
            synced: self
                .columns
                .iter()
                .map(|c| find(c))
                .collect::<Result<_, _>>()?,
        })
    }

    /// The row's synced cells as the shadow keeps them: a JSON object of column →
    /// text.
    fn body(&self, columns: &Columns, row: &Row) -> String {
        let object: serde_json::Map<String, serde_json::Value> = self
            .columns
            .iter()
            .zip(&columns.synced)
            .map(|(name, &c)| {
                (
                    name.clone(),
                    serde_json::Value::String(row.cells[c].clone()),
                )
            })
            .collect();
        serde_json::Value::Object(object).to_string()
    }

    fn field_type(&self, column: &str) -> FieldType {
        self.field_types
            .get(column)
            .copied()
            .unwrap_or(FieldType::Text)
    }
}

/// The tables of `collections`, checked.
fn tables(config: &CsvConfig, collections: Vec<CsvCollection>) -> Result<Vec<Table>, CsvError> {
    let mut tables: Vec<Table> = Vec::with_capacity(collections.len());
    for collection in collections {
        let spec = collection.spec;
        let path = config.folder.join(&spec.table);
        let name = path
            .file_name()
            .map_or_else(|| spec.table.clone(), |n| n.to_string_lossy().into_owned());
        if let Some(d) = collection.delimiter
            && (matches!(d, b'"' | b'\r' | b'\n') || !d.is_ascii())
        {
            return Err(CsvError::BadDelimiter {
                file: name,
                delimiter: char::from(d),
            });
        }
        if tables.iter().any(|t| t.collection == spec.collection) {
            return Err(CsvError::DuplicateCollection {
                collection: spec.collection,
            });
        }
        if tables.iter().any(|t| t.path == path) {
            return Err(CsvError::DuplicateFile { file: name });
        }
        let types = &collection.types;
        let kind = |column: &str| types.get(column).copied().unwrap_or(FieldType::Text);
        tables.push(Table {
            field_types: spec.columns.iter().map(|c| (c.clone(), kind(c))).collect(),
            key_type: kind(&spec.primary_key),
            collection: spec.collection,
            name,
            path,
            key: spec.primary_key,
            columns: spec.columns,
            delimiter: collection.delimiter,
            dirty: Arc::new(AtomicBool::new(false)),
            track: Track::default(),
        });
    }
    Ok(tables)
}

/// What a configuration check learns of each file, reading headers only and
/// changing nothing: a file that does not exist yet is fine (it is created when the
/// connector opens).
pub fn inspect(
    config: &CsvConfig,
    collections: &[CsvCollection],
) -> Result<Vec<TableSchema>, CsvError> {
    let tables = tables(config, collections.to_vec())?;
    tables
        .iter()
        .map(|table| {
            if Stat::of(&table.path).map_err(|e| table.io(e))?.is_some() {
                let bytes = file::read(&table.path, &table.name)?;
                if let Some((header, _)) = file::read_header(&table.name, &bytes, table.delimiter)?
                {
                    table.columns(&header)?;
                }
            }
            Ok(TableSchema {
                assigns_keys: false,
                field_types: table.field_types.clone(),
            })
        })
        .collect()
}

/// The capture sequence number of a cursor (0 for the start).
fn sequence(cursor: &Cursor) -> Result<u64, CsvError> {
    match cursor.as_bytes() {
        [] => Ok(0),
        bytes => <[u8; 8]>::try_from(bytes)
            .map(u64::from_be_bytes)
            .map_err(|_| CsvError::BadCursor { len: bytes.len() }),
    }
}

/// A digest of a file's bytes, to tell whether they are the ones captured.
fn digest(bytes: &[u8]) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

impl Connector for CsvConnector {
    fn kind(&self) -> &'static str {
        "csv"
    }

    /// The file is written once per plan.
    fn writes_per_plan(&self) -> usize {
        crate::BULK_WRITES_PER_PLAN
    }

    fn change_feed(&self) -> ChangeFeed {
        ChangeFeed::Push {
            fallback: self.poll_interval,
        }
    }

    fn field_types(&self, collection: &str) -> Option<&BTreeMap<String, FieldType>> {
        self.table_of(collection)
            .map(|t| &self.tables[t].field_types)
    }

    fn subscribe(&mut self, wake: Wake) -> Result<(), ConnectorError> {
        self.watch = None;
        let targets = self
            .tables
            .iter()
            .map(|table| watch::Target {
                folder: table
                    .path
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new("."))
                    .to_owned(),
                name: table.name.clone(),
                dirty: Arc::clone(&table.dirty),
            })
            .collect::<Vec<_>>();
        let folders = targets
            .iter()
            .map(|t| t.folder.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let started = watch::start(targets, self.debounce, wake).map_err(|e| CsvError::Watch {
            folder: folders,
            message: e.to_string(),
        })?;
        self.watch = Some(started);
        Ok(())
    }

    fn assigns_keys(&self, _collection: &str) -> bool {
        false
    }

    fn claim(&mut self, store: &[u8]) -> Result<(), ConnectorError> {
        let rescan = self.shadow.claim(store).map_err(CsvError::from)?;
        if rescan {
            self.rescan = true;
            for table in &mut self.tables {
                table.track.seen = None;
                table.track.queue = None;
                table.track.invalid.clear();
            }
        }
        Ok(())
    }

    fn changed(&mut self) -> Result<bool, ConnectorError> {
        let mut changed = self.rescan;
        for table in &mut self.tables {
            table.track.event |= table.dirty.swap(false, Ordering::AcqRel);
            let stat = Stat::of(&table.path).map_err(|e| table.io(e))?;
            let track = &mut table.track;
            if track.event && stat.is_some() && stat == track.written {
                // The echo of the connector's own write.
                track.event = false;
            }
            changed |= track.event
                || track.unsettled
                || track.queue.is_some()
                || stat.is_none()
                || track.seen.is_none_or(|s| Some(s.stat) != stat || s.racy);
        }
        Ok(changed)
    }

    fn capture(&mut self, after: &Cursor, max: usize) -> Result<CaptureBatch, ConnectorError> {
        Ok(self.capture_after(after, max)?)
    }

    fn acknowledge(&mut self, durable: &Cursor) -> Result<(), ConnectorError> {
        let seq = sequence(durable)?;
        if seq > 0 {
            self.shadow.acknowledge(seq).map_err(CsvError::from)?;
        }
        Ok(())
    }

    fn write_back(
        &mut self,
        _captured: &Cursor,
        changed_since: &HashSet<RecordKey>,
        ops: &[WriteOp],
    ) -> Result<Vec<OpOutcome>, ConnectorError> {
        let mut outcomes: Vec<Option<OpOutcome>> = vec![None; ops.len()];
        let mut by_table: Vec<Vec<usize>> = vec![Vec::new(); self.tables.len()];
        for (i, op) in ops.iter().enumerate() {
            match self.table_of(op.collection()) {
                Some(t) if matches!(op, WriteOp::Insert { .. }) => {
                    outcomes[i] = Some(self.tables[t].insert_outcome());
                }
                Some(t) => by_table[t].push(i),
                None => {
                    outcomes[i] = Some(OpOutcome::Rejected(Rejection::UnknownCollection {
                        collection: op.collection().to_owned(),
                    }));
                }
            }
        }
        // Nothing is written while any file to write is open in a spreadsheet.
        for (t, indices) in by_table.iter().enumerate() {
            if !indices.is_empty() {
                self.tables[t].check_unlocked()?;
            }
        }
        for (t, indices) in by_table.iter().enumerate() {
            if !indices.is_empty() {
                self.write_table(t, ops, indices, changed_since, &mut outcomes)?;
            }
        }
        debug_assert!(outcomes.iter().all(Option::is_some), "one outcome per op");
        Ok(outcomes
            .into_iter()
            .map(|o| o.unwrap_or(OpOutcome::Stale))
            .collect())
    }
}
