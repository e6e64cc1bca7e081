//! The CalDAV connector: one server account, one collection per calendar, one record
//! per event (keyed by its `UID`; see [`event`] for the record's form).
//!
//! Capture polls each calendar with an RFC 6578 `sync-collection` report from the
//! stored sync token (the cursor), following answers the server cut short, and
//! fetches changed events with `calendar-multiget`. A token the server no longer
//! knows starts a resync: the whole listing by href and ETag, where events are
//! matched by UID (nothing is duplicated) and only hrefs known and now missing are
//! deletes.
//!
//! Write-back is conditional: a new event with `If-None-Match: *`, an update or a
//! delete with `If-Match` of the ETag last captured; a 412 means the event changed
//! since, and the op is [`OpOutcome::Stale`], so the agent captures it, merges, and
//! plans again. The ETag of every write is remembered and its echo in the next sync
//! report is skipped; what does come back is compared with the record in its normal
//! form, so a server's rewrite is never an edit.
//!
//! What the connector knows of each event (its href, ETag, last body and
//! `SEQUENCE`) is kept in a small SQLite file of its own, beside the agent's store.

pub mod event;

mod dav;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crdt_model::{Record, Value};
use rusqlite::{OptionalExtension, params};

use crate::contract::{
    CaptureBatch, CapturedChange, ChangeFeed, CollectionSpec, Connector, ConnectorError, Cursor,
    FieldType, InvalidValue, OpOutcome, RecordKey, Rejection, RowState, TableSchema, WriteOp,
};
pub use dav::DavError;
use dav::{Dav, MULTIGET_MAX, Member, Written};
pub use event::EVENT_FIELDS;

/// How often calendars are polled by default.
pub const POLL_INTERVAL_DEFAULT: Duration = Duration::from_secs(2);

/// Rounds of a `sync-collection` cut short that one capture follows.
const SYNC_ROUNDS_MAX: usize = 1000;

/// The connector's settings.
#[derive(Clone)]
pub struct CaldavConfig {
    /// The server (`http://host:port/`), or a calendar's own address.
    pub url: String,
    /// Basic auth: user and password.
    pub user: Option<(String, String)>,
    /// How often calendars are polled.
    pub poll_interval: Duration,
    /// The connector's own state file.
    pub state: PathBuf,
}

impl std::fmt::Debug for CaldavConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaldavConfig")
            .field("url", &self.url)
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .field("poll_interval", &self.poll_interval)
            .field("state", &self.state)
            .finish()
    }
}

/// Why the connector could not open or work.
#[derive(Debug, thiserror::Error)]
pub enum CaldavError {
    /// A request failed.
    #[error(transparent)]
    Dav(#[from] DavError),
    /// The calendar named is not on the server.
    #[error("calendar `{calendar}` not found at {url}{known}")]
    NoCalendar {
        /// The calendar as configured.
        calendar: String,
        /// Where it was looked for.
        url: String,
        /// The calendars found there (`; calendars there: ...`), if any.
        known: String,
    },
    /// A configured column is not a field of events.
    #[error("calendar `{calendar}`: `{column}` is not a field of events (fields: {fields})")]
    UnknownColumn {
        /// The calendar.
        calendar: String,
        /// The column.
        column: String,
        /// The fields events have.
        fields: String,
    },
    /// The primary key of a calendar is the event's UID.
    #[error("calendar `{calendar}`: events are keyed by `uid`, not `{key}`")]
    PrimaryKey {
        /// The calendar.
        calendar: String,
        /// The key configured.
        key: String,
    },
    /// The state file failed.
    #[error("state file {path}: {message}")]
    State {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
}

/// One synced calendar.
#[derive(Debug)]
struct Calendar {
    collection: String,
    /// The calendar as configured (for messages).
    name: String,
    /// The collection's absolute address, ending in `/`.
    url: String,
    field_types: BTreeMap<String, FieldType>,
}

/// The CalDAV connector (see the [module](self) documentation).
pub struct CaldavConnector {
    dav: Dav,
    base: String,
    calendars: Vec<Calendar>,
    state: rusqlite::Connection,
    state_path: PathBuf,
    poll_interval: Duration,
    /// The next capture lists every event again, reported as a rescan.
    rescan: bool,
}

impl std::fmt::Debug for CaldavConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaldavConnector")
            .field("server", &self.base)
            .field("calendars", &self.calendars.len())
            .finish_non_exhaustive()
    }
}

/// What the connector knows of one event.
#[derive(Debug, Clone)]
struct Known {
    href: String,
    /// `None`: gone from the server.
    etag: Option<String>,
    body: Option<String>,
    sequence: i64,
}

impl CaldavConnector {
    /// Connects to the server, finds each calendar of `specs` (`table`: the
    /// calendar's name under the user's calendar home, or its path), and opens the
    /// state file.
    pub fn open(config: &CaldavConfig, specs: Vec<CollectionSpec>) -> Result<Self, CaldavError> {
        let dav = Dav::new(config.user.clone())?;
        let base = with_slash(&config.url);
        let mut calendars = Vec::with_capacity(specs.len());
        for spec in specs {
            if spec.primary_key != "uid" {
                return Err(CaldavError::PrimaryKey {
                    calendar: spec.table,
                    key: spec.primary_key,
                });
            }
            let field_types = field_types(&spec)?;
            let url = find_calendar(&dav, &base, &spec.table)?;
            calendars.push(Calendar {
                collection: spec.collection,
                name: spec.table,
                url,
                field_types,
            });
        }
        let state = open_state(&config.state)?;
        Ok(CaldavConnector {
            dav,
            base,
            calendars,
            state,
            state_path: config.state.clone(),
            poll_interval: config.poll_interval,
            rescan: false,
        })
    }

    fn state_error(&self, e: rusqlite::Error) -> CaldavError {
        CaldavError::State {
            path: self.state_path.display().to_string(),
            message: e.to_string(),
        }
    }

    fn known(&self, collection: &str, uid: &str) -> Result<Option<Known>, CaldavError> {
        self.state
            .query_row(
                "SELECT href, etag, body, sequence FROM events WHERE collection = ?1 AND uid = ?2",
                params![collection, uid],
                |row| {
                    Ok(Known {
                        href: row.get(0)?,
                        etag: row.get(1)?,
                        body: row.get(2)?,
                        sequence: row.get(3)?,
                    })
                },
            )
            .optional()
            .map_err(|e| self.state_error(e))
    }

    fn remember(
        &self,
        collection: &str,
        uid: &str,
        known: &Known,
        written: bool,
    ) -> Result<(), CaldavError> {
        self.state
            .execute(
                "INSERT INTO events (collection, uid, href, etag, written_etag, body, sequence)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (collection, uid) DO UPDATE SET href = ?3, etag = ?4,
                     written_etag = ?5, body = ?6, sequence = ?7",
                params![
                    collection,
                    uid,
                    known.href,
                    known.etag,
                    if written { known.etag.clone() } else { None },
                    known.body,
                    known.sequence
                ],
            )
            .map_err(|e| self.state_error(e))?;
        Ok(())
    }

    /// The event the server holds at `href`, as last known.
    fn uid_at(&self, collection: &str, href: &str) -> Result<Option<String>, CaldavError> {
        self.state
            .query_row(
                "SELECT uid FROM events WHERE collection = ?1 AND href = ?2 AND etag IS NOT NULL",
                params![collection, href],
                |row| row.get(0),
            )
            .optional()
            .map_err(|e| self.state_error(e))
    }

    /// Event `uid` is gone from the server: remembered so, and reported deleted.
    fn gone(
        &self,
        collection: &str,
        uid: String,
        changes: &mut Vec<CapturedChange>,
    ) -> Result<(), CaldavError> {
        self.state
            .execute(
                "UPDATE events SET etag = NULL, written_etag = NULL WHERE collection = ?1 AND uid = ?2",
                params![collection, uid],
            )
            .map_err(|e| self.state_error(e))?;
        changes.push(CapturedChange {
            collection: collection.to_owned(),
            key: uid,
            previous_key: None,
            state: RowState::Absent,
        });
        Ok(())
    }

    /// Captures one calendar from `token`; returns its new token.
    fn capture_calendar(
        &mut self,
        c: usize,
        token: &str,
        changes: &mut Vec<CapturedChange>,
    ) -> Result<String, CaldavError> {
        let url = self.calendars[c].url.clone();
        let collection = self.calendars[c].collection.clone();
        let full = token.is_empty();
        let mut members: Vec<Member> = Vec::new();
        let mut token = token.to_owned();
        let mut listed_all = full;
        for _ in 0..SYNC_ROUNDS_MAX {
            let report = match self.dav.sync(&url, &token) {
                Err(DavError::TokenRejected) => {
                    tracing::warn!(calendar = %self.calendars[c].name,
                        "the server no longer knows the sync token: listing the calendar again");
                    members.clear();
                    listed_all = true;
                    self.dav.sync(&url, "")?
                }
                other => other?,
            };
            members.extend(report.members);
            token = report.token;
            if !report.truncated {
                break;
            }
        }
        // Hrefs gone: reported gone, or (after a full listing) no longer listed.
        let mut gone: Vec<String> = members
            .iter()
            .filter(|m| m.etag.is_none())
            .map(|m| m.href.clone())
            .collect();
        if listed_all {
            let listed: HashSet<String> = members
                .iter()
                .filter(|m| m.etag.is_some())
                .map(|m| dav::normalize_href(&m.href))
                .collect();
            let mut statement = self
                .state
                .prepare("SELECT href FROM events WHERE collection = ?1 AND etag IS NOT NULL")
                .map_err(|e| self.state_error(e))?;
            let known: Vec<String> = statement
                .query_map(params![collection], |row| row.get(0))
                .and_then(Iterator::collect)
                .map_err(|e| self.state_error(e))?;
            drop(statement);
            gone.extend(
                known
                    .into_iter()
                    .filter(|href| !listed.contains(&dav::normalize_href(href))),
            );
        }
        for href in gone {
            if let Some(uid) = self.uid_at(&collection, &href)? {
                self.gone(&collection, uid, changes)?;
            }
        }
        // Changed events, without the echoes of this connector's own writes (unless
        // everything is listed again for a new store).
        let mut fetch = Vec::new();
        for member in members {
            let Some(etag) = &member.etag else { continue };
            if !self.rescan && !full {
                let written: Option<Option<String>> = self
                    .state
                    .query_row(
                        "SELECT written_etag FROM events WHERE collection = ?1 AND href = ?2",
                        params![collection, member.href],
                        |row| row.get(0),
                    )
                    .optional()
                    .map_err(|e| self.state_error(e))?;
                if written.flatten().as_deref() == Some(etag.as_str()) {
                    continue;
                }
            }
            fetch.push(member.href);
        }
        for chunk in fetch.chunks(MULTIGET_MAX) {
            for member in self.dav.multiget(&url, chunk)? {
                self.captured_member(c, member, changes)?;
            }
        }
        Ok(token)
    }

    /// Records one fetched event and reports it.
    fn captured_member(
        &mut self,
        c: usize,
        member: Member,
        changes: &mut Vec<CapturedChange>,
    ) -> Result<(), CaldavError> {
        let calendar = &self.calendars[c];
        let collection = calendar.collection.clone();
        let (Some(etag), Some(body)) = (member.etag, member.body) else {
            // Gone between the report and the fetch: the next report says so.
            return Ok(());
        };
        let previous = self.uid_at(&collection, &member.href)?;
        match event::read(&body) {
            Ok((uid, record)) => {
                if let Some(previous) = previous.filter(|p| *p != uid) {
                    // The resource now holds another event: the old one is gone.
                    self.gone(&collection, previous, changes)?;
                }
                let known = Known {
                    href: member.href,
                    etag: Some(etag),
                    sequence: event::sequence(&body),
                    body: Some(body),
                };
                self.remember(&collection, &uid, &known, false)?;
                let fields = calendar_fields(&self.calendars[c], record);
                changes.push(CapturedChange {
                    collection,
                    key: uid,
                    previous_key: None,
                    state: RowState::Present(fields),
                });
            }
            Err(event::ReadError::NotAnEvent) => {}
            Err(event::ReadError::Invalid(e)) => {
                let key = previous.unwrap_or_else(|| member.href.clone());
                changes.push(CapturedChange {
                    collection,
                    key: key.clone(),
                    previous_key: None,
                    state: RowState::Invalid(InvalidValue {
                        table: self.calendars[c].name.clone(),
                        key,
                        column: "calendar-data".to_owned(),
                        found: e.to_string(),
                        expected: FieldType::Text,
                        declared: format!("an iCalendar event at {}", member.href),
                    }),
                });
            }
        }
        Ok(())
    }

    fn calendar_of(&self, collection: &str) -> Option<usize> {
        self.calendars
            .iter()
            .position(|c| c.collection == collection)
    }

    fn write_one(
        &mut self,
        changed_since: &HashSet<RecordKey>,
        op: &WriteOp,
    ) -> Result<OpOutcome, CaldavError> {
        let collection = op.collection();
        let Some(c) = self.calendar_of(collection) else {
            return Ok(OpOutcome::Rejected(Rejection::UnknownCollection {
                collection: collection.to_owned(),
            }));
        };
        if let Some(key) = op.key()
            && changed_since.contains(&(collection.to_owned(), key.to_owned()))
        {
            return Ok(OpOutcome::Stale);
        }
        match op {
            WriteOp::Upsert { key, fields, .. } => self.put(c, key, fields, false),
            WriteOp::Insert { token, fields, .. } => {
                let uid = match fields.get("uid") {
                    Some(Value::Text(uid)) if !uid.is_empty() => uid.clone(),
                    _ => format!("{token}@concord"),
                };
                self.put(c, &uid, fields, true)
            }
            WriteOp::Delete { key, .. } => {
                let Some(known) = self.known(collection, key)? else {
                    return Ok(OpOutcome::WRITTEN);
                };
                let Some(etag) = known.etag.clone() else {
                    return Ok(OpOutcome::WRITTEN);
                };
                let url = self.absolute(&known.href);
                match self.dav.delete(&url, &etag)? {
                    Written::Done(_) => {
                        let gone = Known {
                            etag: None,
                            ..known
                        };
                        self.remember(collection, key, &gone, false)?;
                        Ok(OpOutcome::WRITTEN)
                    }
                    Written::Precondition => Ok(OpOutcome::Stale),
                    Written::Refused(status, message) => Ok(self.refused(c, key, status, message)),
                }
            }
        }
    }

    /// Writes the event `uid` with `fields` over what the server last held.
    fn put(
        &mut self,
        c: usize,
        uid: &str,
        fields: &Record,
        insert: bool,
    ) -> Result<OpOutcome, CaldavError> {
        let collection = self.calendars[c].collection.clone();
        let known = self.known(&collection, uid)?.filter(|k| k.etag.is_some());
        if insert && let Some(known) = &known {
            // An insert retried after a crash: the event is there already.
            return Ok(OpOutcome::Written {
                key: Some(uid.to_owned()),
                version: known.etag.clone(),
            });
        }
        let mut record = match known.as_ref().and_then(|k| k.body.as_deref()) {
            Some(body) => event::read(body).map(|(_, r)| r).unwrap_or_default(),
            None => Record::new(),
        };
        for (name, value) in fields {
            record.insert(name.clone(), value.clone());
        }
        record.insert("uid".to_owned(), Value::Text(uid.to_owned()));
        let sequence = known.as_ref().map_or(0, |k| k.sequence + 1);
        let body = match event::write(&record, sequence, chrono::Utc::now()) {
            Ok(body) => body,
            Err(e) => {
                return Ok(OpOutcome::Rejected(Rejection::ValueDoesNotFit {
                    table: self.calendars[c].name.clone(),
                    key: uid.to_owned(),
                    column: "calendar-data".to_owned(),
                    problem: e.to_string(),
                }));
            }
        };
        let href = match &known {
            Some(k) => k.href.clone(),
            None => format!("{}{}.ics", path_of(&self.calendars[c].url), href_name(uid)),
        };
        let url = self.absolute(&href);
        let etag = known.as_ref().and_then(|k| k.etag.as_deref());
        match self.dav.put(&url, body.clone(), etag)? {
            Written::Done(etag) => {
                let etag = match etag {
                    Some(etag) => Some(etag),
                    None => self
                        .dav
                        .propfind(&url, 0, "<D:getetag/>")?
                        .into_iter()
                        .find_map(|m| m.etag),
                };
                let written = Known {
                    href,
                    etag: etag.clone(),
                    body: Some(body),
                    sequence,
                };
                self.remember(&collection, uid, &written, true)?;
                Ok(OpOutcome::Written {
                    key: insert.then(|| uid.to_owned()),
                    version: etag,
                })
            }
            Written::Precondition => Ok(OpOutcome::Stale),
            Written::Refused(status, message) => Ok(self.refused(c, uid, status, message)),
        }
    }

    fn refused(&self, c: usize, key: &str, status: u16, message: String) -> OpOutcome {
        OpOutcome::Rejected(Rejection::Refused {
            tool: "CalDAV".to_owned(),
            table: self.calendars[c].name.clone(),
            key: key.to_owned(),
            message: format!("{status} {message}"),
        })
    }

    fn absolute(&self, href: &str) -> String {
        if href.starts_with("http://") || href.starts_with("https://") {
            return href.to_owned();
        }
        format!("{}{}", origin(&self.base), href)
    }
}

/// The record's fields this calendar syncs.
fn calendar_fields(calendar: &Calendar, mut record: Record) -> Record {
    record.retain(|name, _| calendar.field_types.contains_key(name));
    record
}

/// The type of an event field.
fn event_field_type(field: &str) -> Option<FieldType> {
    Some(match field {
        "start" | "end" => FieldType::Timestamp,
        "exdates" | "rdates" | "overrides" | "attendees" | "organizer" | "params" => {
            FieldType::Json
        }
        _ if EVENT_FIELDS.contains(&field) => FieldType::Text,
        _ => return None,
    })
}

/// `scheme://host:port` of an address.
fn origin(url: &str) -> &str {
    match url.find("://") {
        Some(scheme) => {
            let rest = &url[scheme + 3..];
            rest.find('/')
                .map_or(url, |slash| &url[..scheme + 3 + slash])
        }
        None => url,
    }
}

/// The path of an address.
fn path_of(url: &str) -> &str {
    &url[origin(url).len()..]
}

/// A resource name for an event: its UID with anything but letters, digits, `-`,
/// `_`, `.` and `@` percent-encoded.
fn href_name(uid: &str) -> String {
    let mut out = String::with_capacity(uid.len());
    for byte in uid.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'@') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The address of calendar `name`: a path or address as given, or a name under the
/// user's calendar home (found from the server's `current-user-principal`).
fn find_calendar(dav: &Dav, base: &str, name: &str) -> Result<String, CaldavError> {
    let url = if name.starts_with("http://") || name.starts_with("https://") {
        name.to_owned()
    } else if name.starts_with('/') {
        format!("{}{name}", origin(base))
    } else if name.is_empty() {
        base.to_owned()
    } else {
        let home = calendar_home(dav, base)?;
        format!("{home}{name}")
    };
    let url = if url.ends_with('/') {
        url
    } else {
        format!("{url}/")
    };
    let found = dav.propfind(&url, 0, "<D:resourcetype/>");
    match found {
        Ok(members) if members.iter().any(|m| m.collection) => Ok(url),
        Ok(_) | Err(DavError::Status { status: 404, .. }) => {
            let parent = url.trim_end_matches('/');
            let parent = &parent[..parent.rfind('/').map_or(0, |i| i + 1)];
            let known = dav
                .propfind(parent, 1, "<D:resourcetype/>")
                .map(|members| {
                    members
                        .iter()
                        .filter(|m| m.collection)
                        .map(|m| {
                            m.href
                                .trim_end_matches('/')
                                .rsplit('/')
                                .next()
                                .unwrap_or("")
                        })
                        .filter(|n| {
                            !n.is_empty()
                                && parent.trim_end_matches('/').rsplit('/').next() != Some(n)
                        })
                        .map(str::to_owned)
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            Err(CaldavError::NoCalendar {
                calendar: name.to_owned(),
                url,
                known: if known.is_empty() {
                    String::new()
                } else {
                    format!("; calendars there: {}", known.join(", "))
                },
            })
        }
        Err(e) => Err(e.into()),
    }
}

fn calendar_home(dav: &Dav, base: &str) -> Result<String, CaldavError> {
    let principal = dav
        .propfind(base, 0, "<D:current-user-principal/>")?
        .into_iter()
        .find_map(|m| m.link)
        .unwrap_or_else(|| path_of(base).to_owned());
    let principal_url = format!("{}{}", origin(base), principal);
    let home = dav
        .propfind(&principal_url, 0, "<C:calendar-home-set/>")?
        .into_iter()
        .find_map(|m| m.link)
        .unwrap_or(principal);
    let home = if home.starts_with("http") {
        home
    } else {
        format!("{}{}", origin(base), home)
    };
    Ok(if home.ends_with('/') {
        home
    } else {
        format!("{home}/")
    })
}

fn open_state(path: &Path) -> Result<rusqlite::Connection, CaldavError> {
    let error = |e: rusqlite::Error| CaldavError::State {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| CaldavError::State {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
    }
    let state = rusqlite::Connection::open(path).map_err(error)?;
    state
        .execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS events (
                 collection TEXT NOT NULL,
                 uid TEXT NOT NULL,
                 href TEXT NOT NULL,
                 etag TEXT,
                 written_etag TEXT,
                 body TEXT,
                 sequence INTEGER NOT NULL DEFAULT 0,
                 PRIMARY KEY (collection, uid)
             );
             CREATE INDEX IF NOT EXISTS events_href ON events (collection, href);
             CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);",
        )
        .map_err(error)?;
    Ok(state)
}

/// The cursor: each calendar's sync token, by collection.
fn tokens(cursor: &Cursor) -> BTreeMap<String, String> {
    serde_json::from_slice(cursor.as_bytes()).unwrap_or_default()
}

fn connector_error(e: CaldavError) -> ConnectorError {
    ConnectorError(Box::new(e))
}

impl Connector for CaldavConnector {
    fn kind(&self) -> &'static str {
        "caldav"
    }

    fn change_feed(&self) -> ChangeFeed {
        ChangeFeed::Poll {
            interval: self.poll_interval,
            idle: self.poll_interval,
        }
    }

    fn field_types(&self, collection: &str) -> Option<&BTreeMap<String, FieldType>> {
        self.calendars
            .iter()
            .find(|c| c.collection == collection)
            .map(|c| &c.field_types)
    }

    fn assigns_keys(&self, _collection: &str) -> bool {
        true
    }

    fn claim(&mut self, store: &[u8]) -> Result<(), ConnectorError> {
        let store = crate::shadow::hex(store);
        let claimed: Option<String> = self
            .state
            .query_row("SELECT value FROM meta WHERE name = 'store'", [], |row| {
                row.get(0)
            })
            .optional()
            .map_err(|e| connector_error(self.state_error(e)))?;
        if claimed.as_deref() != Some(store.as_str()) {
            self.rescan = claimed.is_some();
            self.state
                .execute(
                    "INSERT INTO meta (name, value) VALUES ('store', ?1)
                     ON CONFLICT (name) DO UPDATE SET value = ?1",
                    params![store],
                )
                .map_err(|e| connector_error(self.state_error(e)))?;
        }
        Ok(())
    }

    fn changed(&mut self) -> Result<bool, ConnectorError> {
        Ok(true)
    }

    fn capture(&mut self, after: &Cursor, _max: usize) -> Result<CaptureBatch, ConnectorError> {
        let mut tokens = tokens(after);
        let rescan = self.rescan;
        let mut changes = Vec::new();
        for c in 0..self.calendars.len() {
            let collection = self.calendars[c].collection.clone();
            let from = if rescan {
                String::new()
            } else {
                tokens.get(&collection).cloned().unwrap_or_default()
            };
            let token = self
                .capture_calendar(c, &from, &mut changes)
                .map_err(connector_error)?;
            tokens.insert(collection, token);
        }
        self.rescan = false;
        let cursor = Cursor(serde_json::to_vec(&tokens).unwrap_or_default());
        if changes.is_empty() && !rescan {
            // Nothing new: keep the cursor unless a token moved (own writes).
            return Ok(CaptureBatch {
                changes,
                cursor: if tokens == self::tokens(after) {
                    after.clone()
                } else {
                    cursor
                },
                rescan: false,
            });
        }
        Ok(CaptureBatch {
            changes,
            cursor,
            rescan,
        })
    }

    fn acknowledge(&mut self, _durable: &Cursor) -> Result<(), ConnectorError> {
        Ok(())
    }

    fn write_back(
        &mut self,
        _captured: &Cursor,
        changed_since: &HashSet<RecordKey>,
        ops: &[WriteOp],
    ) -> Result<Vec<OpOutcome>, ConnectorError> {
        let mut outcomes = Vec::with_capacity(ops.len());
        for op in ops {
            outcomes.push(self.write_one(changed_since, op).map_err(connector_error)?);
        }
        Ok(outcomes)
    }
}

/// What a configuration check learns of each calendar, without changing anything.
pub fn inspect(
    config: &CaldavConfig,
    specs: &[CollectionSpec],
) -> Result<Vec<TableSchema>, CaldavError> {
    let dav = Dav::new(config.user.clone())?;
    let base = with_slash(&config.url);
    specs
        .iter()
        .map(|spec| {
            find_calendar(&dav, &base, &spec.table)?;
            Ok(TableSchema {
                assigns_keys: true,
                field_types: field_types(spec)?,
            })
        })
        .collect()
}

/// The type of each configured column of a calendar; a column that is no event
/// field is an error.
fn field_types(spec: &CollectionSpec) -> Result<BTreeMap<String, FieldType>, CaldavError> {
    spec.columns
        .iter()
        .map(|column| {
            let kind = event_field_type(column).ok_or_else(|| CaldavError::UnknownColumn {
                calendar: spec.table.clone(),
                column: column.clone(),
                fields: EVENT_FIELDS.join(", "),
            })?;
            Ok((column.clone(), kind))
        })
        .collect()
}

fn with_slash(url: &str) -> String {
    if url.ends_with('/') {
        url.to_owned()
    } else {
        format!("{url}/")
    }
}

/// Every field of events: what a calendar configured without `columns` syncs.
pub fn all_fields() -> Vec<String> {
    EVENT_FIELDS.iter().map(|f| (*f).to_owned()).collect()
}
