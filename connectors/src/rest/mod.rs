//! The REST connector: a web app reached through its HTTP API, described by
//! configuration alone (see [`RestApi`]): one app per tool, one collection per
//! resource, one record per JSON object, keyed by the id the app assigns.
//!
//! Capture has three sources, all ending in the same diff against the connector's
//! [`Shadow`]:
//! - **webhooks** ([`Webhooks`]): the app calls the agent; each call names a record,
//!   which is fetched (a 404 is a delete);
//! - **polling**: the list endpoint filtered by the app's updated-at field, from the
//!   latest value seen minus an overlap window (clocks of app and agent may differ;
//!   what the overlap lists again is no change, as the diff shows), at the poll
//!   interval;
//! - **reconciliation**: the whole list at a longer interval; ids the shadow holds
//!   and the app no longer lists are deletes, and anything polling missed is found.
//!
//! Write-back fetches each record first and refuses the op as stale when it changed
//! since it was captured (the app has no conditional writes to lean on); the record
//! is then captured at once. Records the app refuses (400, 409, 422) are rejections
//! with the app's message. Requests run a few at a time; see [`http`] for rate
//! limits and retries.

mod http;
pub mod webhook;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crdt_model::Record;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};

use crate::contract::{
    CaptureBatch, CapturedChange, ChangeFeed, CollectionSpec, Connector, ConnectorError, Cursor,
    FieldType, InvalidValue, OpOutcome, RecordKey, Rejection, RowState, TableSchema, Wake, WriteOp,
};
use crate::shadow::{Shadow, ShadowError};
use crate::values::{from_json_typed, parse_timestamp, shorten, to_json_lenient};
use http::{Api, Reply, Request, Sender};
pub use http::{Auth, HttpError};
pub use webhook::{WebhookError, Webhooks};

/// How often the app is polled by default.
pub const POLL_INTERVAL_DEFAULT: Duration = Duration::from_secs(5);
/// The overlap window by default.
pub const OVERLAP_DEFAULT: Duration = Duration::from_secs(5);
/// How often ids are reconciled by default.
pub const RECONCILE_INTERVAL_DEFAULT: Duration = Duration::from_secs(300);
/// Requests in flight at most, by default.
pub const CONCURRENCY_DEFAULT: usize = 4;
/// How long one request may take, by default.
pub const TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);
/// The format of `since` by default (RFC 3339, UTC, milliseconds).
pub const SINCE_FORMAT_DEFAULT: &str = "%Y-%m-%dT%H:%M:%S%.3fZ";
/// Records per page by default.
pub const PAGE_SIZE_DEFAULT: usize = 200;
/// Webhook calls waiting at one capture from which a listing answers them,
/// rather than one fetch each.
const WEBHOOK_CALLS_LISTED: usize = 32;
/// Pages one listing follows at most.
const PAGES_MAX: usize = 100_000;

/// Characters a value placed in an address keeps as they are.
const URL_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// The connector's settings.
#[derive(Debug, Clone)]
pub struct RestConfig {
    /// The API's base address; request paths are relative to it.
    pub url: String,
    /// How requests authenticate.
    pub auth: Auth,
    /// How often the list endpoint is polled (with webhooks: the fallback).
    pub poll_interval: Duration,
    /// How far back each poll starts before the latest update seen.
    pub overlap: Duration,
    /// How often every id is listed to find deletes.
    pub reconcile_interval: Duration,
    /// Requests in flight at most.
    pub concurrency: usize,
    /// How long one request may take.
    pub timeout: Duration,
    /// The connector's shadow file.
    pub state: PathBuf,
    /// The tool's webhook endpoint, if the app calls one.
    pub webhooks: Option<Arc<Webhooks>>,
}

/// How a list endpoint pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Pagination {
    /// `page` counts from 1.
    #[default]
    Page,
    /// `offset` counts records from 0.
    Offset,
    /// Each answer names the next page's `cursor`.
    Cursor,
}

/// One collection's API, in templates (`{{ id }}`, `{{ since }}`, `{{ page }}`,
/// `{{ offset }}`, `{{ limit }}`, `{{ cursor }}`; values are percent-encoded) and
/// JSON pointers (RFC 6901: `/items`; the empty pointer is the whole body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestApi {
    /// The list request's path and query, with the updated-since filter, the sort
    /// by updated-at and the page.
    pub list: String,
    /// The path of one record (`{{ id }}`).
    pub get: String,
    /// `METHOD path` creating a record (`POST /records`).
    pub create: String,
    /// `METHOD path` updating a record (`PATCH /records/{{ id }}`).
    pub update: String,
    /// `METHOD path` deleting a record (`DELETE /records/{{ id }}`).
    pub delete: String,
    /// Where the records are in a list answer.
    pub records: String,
    /// Where the record is in an answer about one record.
    pub record: String,
    /// Where the fields go in a create or update request's body.
    pub body: String,
    /// The field holding when the record last changed.
    pub updated: String,
    /// How `{{ since }}` is written (strftime, UTC).
    pub since_format: String,
    /// How the list pages.
    pub pagination: Pagination,
    /// Records per page (`{{ limit }}`).
    pub page_size: usize,
    /// Where a list answer names the next page's cursor (cursor pagination).
    pub next_cursor: String,
}

/// One synced collection of the app.
#[derive(Debug, Clone)]
pub struct RestCollection {
    /// The collection (`table` is the app's name for it, as webhooks name it;
    /// `primary_key` the id field).
    pub spec: CollectionSpec,
    /// Declared types of fields; others are taken as the JSON holds them.
    pub types: BTreeMap<String, FieldType>,
    /// Its API.
    pub api: RestApi,
}

/// Why the connector could not open or work.
#[derive(Debug, thiserror::Error)]
pub enum RestError {
    /// A request failed after its retries.
    #[error(transparent)]
    Http(#[from] HttpError),
    /// A template or request line of the config is wrong.
    #[error("collection `{collection}`: `{setting}`: {message}")]
    Config {
        /// The collection.
        collection: String,
        /// The setting (`list`, `update`, ...).
        setting: String,
        /// What is wrong.
        message: String,
    },
    /// An answer is not what the config describes.
    #[error("collection `{collection}`: {message}")]
    Answer {
        /// The collection.
        collection: String,
        /// What is wrong.
        message: String,
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

impl From<ShadowError> for RestError {
    fn from(e: ShadowError) -> RestError {
        RestError::State {
            path: e.path,
            message: e.message,
        }
    }
}

/// One collection, compiled.
#[derive(Debug)]
struct Collection {
    spec: CollectionSpec,
    api: RestApi,
    field_types: BTreeMap<String, FieldType>,
    declared: BTreeMap<String, FieldType>,
    create: Line,
    update: Line,
    delete: Line,
}

/// A create, update or delete request: its method and path template.
#[derive(Debug)]
struct Line {
    method: Method,
    path: String,
}

/// The parts of the create, update and delete lines (method and path template).
fn request_line(line: &str) -> Option<(Method, &str)> {
    let (method, path) = line.trim().split_once(char::is_whitespace)?;
    Some((Method::from_bytes(method.as_bytes()).ok()?, path.trim()))
}

/// The cursor: the last capture's sequence, and each collection's latest update
/// seen (microseconds).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Position {
    seq: u64,
    since: BTreeMap<String, i64>,
}

impl Position {
    fn of(cursor: &Cursor) -> Position {
        serde_json::from_slice(cursor.as_bytes()).unwrap_or_default()
    }

    fn cursor(&self) -> Cursor {
        Cursor(serde_json::to_vec(self).unwrap_or_default())
    }
}

/// The REST connector (see the [module](self) documentation).
pub struct RestConnector {
    api: Api,
    base: String,
    collections: Vec<Collection>,
    shadow: Shadow,
    templates: minijinja::Environment<'static>,
    webhooks: Option<Arc<Webhooks>>,
    poll_interval: Duration,
    overlap: Duration,
    reconcile_interval: Duration,
    next_poll: Instant,
    next_reconcile: Instant,
    /// Records to fetch at the next capture (a write-back found them changed).
    recheck: Vec<(usize, String)>,
    /// The next capture reports every record, as a rescan.
    rescan: bool,
}

impl std::fmt::Debug for RestConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestConnector")
            .field("app", &self.base)
            .field("collections", &self.collections.len())
            .finish_non_exhaustive()
    }
}

/// The templating environment: strict about unknown variables, and every value it
/// places percent-encoded.
fn templates() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.set_formatter(|out, _state, value| {
        let text = value.to_string();
        out.write_str(&utf8_percent_encode(&text, URL_VALUE).to_string())
            .map_err(|_| minijinja::Error::new(minijinja::ErrorKind::WriteFailure, "write"))
    });
    env
}

/// The variables of a list request's template.
#[derive(Debug, Clone, Serialize)]
struct ListVars {
    since: String,
    page: usize,
    offset: usize,
    limit: usize,
    cursor: String,
}

/// Checks `source` renders with `vars`, naming the setting if not.
fn check_template<S: Serialize>(
    env: &minijinja::Environment<'static>,
    collection: &str,
    setting: &str,
    source: &str,
    vars: S,
) -> Result<(), RestError> {
    env.render_str(source, vars)
        .map(drop)
        .map_err(|e| RestError::Config {
            collection: collection.to_owned(),
            setting: setting.to_owned(),
            message: template_message(&e),
        })
}

fn template_message(e: &minijinja::Error) -> String {
    match e.detail() {
        Some(detail) => format!("{} ({detail})", e.kind()),
        None => e.kind().to_string(),
    }
}

/// Compiles the collections: templates checked, request lines parsed.
fn compile(collections: Vec<RestCollection>) -> Result<Vec<Collection>, RestError> {
    let env = templates();
    let list_vars = ListVars {
        since: String::new(),
        page: 1,
        offset: 0,
        limit: 1,
        cursor: String::new(),
    };
    let id_vars = minijinja::context! { id => "x" };
    collections
        .into_iter()
        .map(|c| {
            let name = c.spec.collection.clone();
            let config = |setting: &str, message: String| RestError::Config {
                collection: name.clone(),
                setting: setting.to_owned(),
                message,
            };
            check_template(&env, &name, "list", &c.api.list, &list_vars)?;
            check_template(&env, &name, "get", &c.api.get, &id_vars)?;
            let mut lines = Vec::new();
            for (setting, line) in [
                ("create", &c.api.create),
                ("update", &c.api.update),
                ("delete", &c.api.delete),
            ] {
                let (method, path) = request_line(line).ok_or_else(|| {
                    config(
                        setting,
                        format!(
                            "`{line}` is not `METHOD path` (e.g. `PATCH /records/{{{{ id }}}}`)"
                        ),
                    )
                })?;
                check_template(&env, &name, setting, path, &id_vars)?;
                lines.push(Line {
                    method,
                    path: path.to_owned(),
                });
            }
            for (setting, pointer) in [
                ("records", &c.api.records),
                ("record", &c.api.record),
                ("body", &c.api.body),
                ("next_cursor", &c.api.next_cursor),
            ] {
                if !pointer.is_empty() && !pointer.starts_with('/') {
                    return Err(config(
                        setting,
                        format!(
                            "`{pointer}` is not a JSON pointer (they start with `/`, e.g. `/items`)"
                        ),
                    ));
                }
            }
            if c.api.pagination == Pagination::Cursor && c.api.next_cursor.is_empty() {
                return Err(config(
                    "next_cursor",
                    "cursor pagination needs `next_cursor`, where an answer names the next page"
                        .to_owned(),
                ));
            }
            let field_types = c
                .spec
                .columns
                .iter()
                .map(|column| {
                    (
                        column.clone(),
                        c.types.get(column).copied().unwrap_or(FieldType::Text),
                    )
                })
                .collect();
            let [create, update, delete]: [Line; 3] = lines
                .try_into()
                .unwrap_or_else(|_| unreachable!("three request lines were parsed"));
            Ok(Collection {
                spec: c.spec,
                api: c.api,
                field_types,
                declared: c.types,
                create,
                update,
                delete,
            })
        })
        .collect()
}

impl RestConnector {
    /// Checks the collections' API descriptions and opens the shadow file. Nothing
    /// is asked of the app until the first capture.
    pub fn open(config: &RestConfig, collections: Vec<RestCollection>) -> Result<Self, RestError> {
        let collections = compile(collections)?;
        let api = Api::new(config.auth.clone(), config.timeout, config.concurrency)?;
        let shadow = Shadow::open(&config.state)?;
        let now = Instant::now();
        Ok(RestConnector {
            api,
            base: config.url.trim_end_matches('/').to_owned(),
            collections,
            shadow,
            templates: templates(),
            webhooks: config.webhooks.clone(),
            poll_interval: config.poll_interval,
            overlap: config.overlap,
            reconcile_interval: config.reconcile_interval,
            next_poll: now,
            next_reconcile: now + config.reconcile_interval,
            recheck: Vec::new(),
            rescan: false,
        })
    }

    fn url(
        &self,
        c: usize,
        setting: &str,
        template: &str,
        vars: impl Serialize,
    ) -> Result<String, RestError> {
        render_url(
            &self.templates,
            &self.base,
            &self.collections[c].spec.collection,
            setting,
            template,
            vars,
        )
    }

    fn record_url(
        &self,
        c: usize,
        setting: &str,
        template: &str,
        id: &str,
    ) -> Result<String, RestError> {
        self.url(c, setting, template, minijinja::context! { id => id })
    }

    /// Lists collection `c` from `since` (microseconds), every page.
    fn list(&self, c: usize, since: i64) -> Result<Vec<serde_json::Value>, RestError> {
        let collection = &self.collections[c];
        let api = &collection.api;
        let since = chrono::DateTime::<chrono::Utc>::from_timestamp_micros(since)
            .unwrap_or_default()
            .format(&api.since_format)
            .to_string();
        let mut vars = ListVars {
            since,
            page: 1,
            offset: 0,
            limit: api.page_size,
            cursor: String::new(),
        };
        let mut all = Vec::new();
        for _ in 0..PAGES_MAX {
            let url = self.url(c, "list", &api.list, &vars)?;
            let reply = self.api.send(Request {
                method: Method::GET,
                url,
                body: None,
            })?;
            if !reply.status.is_success() {
                return Err(RestError::Answer {
                    collection: collection.spec.collection.clone(),
                    message: format!("the list request was answered {}", reply.message()),
                });
            }
            let records = match reply.json.pointer(&api.records) {
                Some(serde_json::Value::Array(records)) => records.clone(),
                _ => {
                    return Err(RestError::Answer {
                        collection: collection.spec.collection.clone(),
                        message: format!(
                            "the list answer has no array of records at `{}`",
                            api.records
                        ),
                    });
                }
            };
            let count = records.len();
            all.extend(records);
            match api.pagination {
                Pagination::Page | Pagination::Offset => {
                    if count < api.page_size || count == 0 {
                        break;
                    }
                    vars.page += 1;
                    vars.offset += count;
                }
                Pagination::Cursor => {
                    let next = reply.json.pointer(&api.next_cursor).and_then(|n| match n {
                        serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
                        serde_json::Value::Number(n) => Some(n.to_string()),
                        _ => None,
                    });
                    match next {
                        Some(next) if next != vars.cursor && count > 0 => vars.cursor = next,
                        _ => break,
                    }
                }
            }
        }
        Ok(all)
    }

    /// Fetches records by id, a few at a time: each is `Some(record)`, or `None`
    /// when the app no longer has it.
    fn fetch(
        &self,
        wanted: &[(usize, String)],
    ) -> Result<Vec<Option<serde_json::Value>>, RestError> {
        let mut requests = Vec::with_capacity(wanted.len());
        for (c, id) in wanted {
            let url = self.record_url(*c, "get", &self.collections[*c].api.get, id)?;
            requests.push((
                *c,
                Request {
                    method: Method::GET,
                    url,
                    body: None,
                },
            ));
        }
        let sender = self.api.sender();
        let replies = self.api.block_on(run_all(
            self.api.concurrency,
            requests.into_iter().map(|(_, r)| {
                let sender = sender.clone();
                async move { sender.send(r).await }
            }),
        ));
        let mut out = Vec::with_capacity(wanted.len());
        for ((c, id), reply) in wanted.iter().zip(replies) {
            let reply = reply.ok_or_else(|| lost_task(&self.collections[*c].spec.collection))??;
            if reply.status == StatusCode::NOT_FOUND {
                out.push(None);
            } else if reply.status.is_success() {
                out.push(Some(self.record_in(*c, &reply)?));
            } else {
                return Err(RestError::Answer {
                    collection: self.collections[*c].spec.collection.clone(),
                    message: format!("fetching record {id} was answered {}", reply.message()),
                });
            }
        }
        Ok(out)
    }

    /// The record in an answer about one record.
    fn record_in(&self, c: usize, reply: &Reply) -> Result<serde_json::Value, RestError> {
        let pointer = &self.collections[c].api.record;
        match reply.json.pointer(pointer) {
            Some(record @ serde_json::Value::Object(_)) => Ok(record.clone()),
            _ => Err(RestError::Answer {
                collection: self.collections[c].spec.collection.clone(),
                message: format!("the answer has no record (a JSON object) at `{pointer}`"),
            }),
        }
    }

    /// The collection a webhook names (by the app's name or the collection's).
    fn collection_named(&self, name: Option<&str>) -> Option<usize> {
        match name {
            None => (self.collections.len() == 1).then_some(0),
            Some(name) => self
                .collections
                .iter()
                .position(|c| c.spec.table == name || c.spec.collection == name),
        }
    }

    /// Looks at the app: lists it when a poll or a reconciliation is due (or many
    /// webhook calls came at once: one listing answers them in a few requests),
    /// then fetches the records named by `recheck` and by webhook `calls` that the
    /// listing did not show. Returns every record looked at, in order, each in its
    /// state then (`None`: gone).
    fn look(
        &mut self,
        position: &mut Position,
        list_all: bool,
        recheck: &[(usize, String)],
        calls: &[(Option<String>, String)],
    ) -> Result<Vec<(usize, String, Option<serde_json::Value>)>, RestError> {
        let mut seen = Vec::new();
        let mut listed: HashSet<(usize, String)> = HashSet::new();
        let now = Instant::now();
        let reconcile = list_all || now >= self.next_reconcile;
        if reconcile || now >= self.next_poll || calls.len() >= WEBHOOK_CALLS_LISTED {
            for c in 0..self.collections.len() {
                let name = self.collections[c].spec.collection.clone();
                let latest = position.since.get(&name).copied();
                let from = match latest {
                    Some(latest) if !reconcile => latest - self.overlap.as_micros() as i64,
                    _ => 0,
                };
                let mut newest = latest;
                for record in self.list(c, from)? {
                    let Some(id) = self.id_of(c, &record) else {
                        continue;
                    };
                    if let Some(updated) = self.updated_of(c, &record) {
                        newest = Some(newest.map_or(updated, |n| n.max(updated)));
                    }
                    listed.insert((c, id.clone()));
                    seen.push((c, id, Some(record)));
                }
                if reconcile {
                    for key in self.shadow.keys(&name)? {
                        if !listed.contains(&(c, key.clone())) {
                            seen.push((c, key, None));
                        }
                    }
                }
                if let Some(newest) = newest {
                    position.since.insert(name, newest);
                }
            }
            self.next_poll = Instant::now() + self.poll_interval;
            if reconcile {
                self.next_reconcile = Instant::now() + self.reconcile_interval;
            }
        }
        let mut fetch: Vec<(usize, String)> = recheck.to_vec();
        for (name, id) in calls {
            match self.collection_named(name.as_deref()) {
                // A record the listing showed is as new as the call; a deleted one
                // is never listed, so it is fetched.
                Some(c) if !listed.contains(&(c, id.clone())) => fetch.push((c, id.clone())),
                Some(_) => {}
                None => tracing::debug!(collection = ?name, "a webhook names no synced collection"),
            }
        }
        fetch.sort();
        fetch.dedup();
        let fetched = self.fetch(&fetch)?;
        seen.extend(
            fetch
                .into_iter()
                .zip(fetched)
                .map(|((c, id), record)| (c, id, record)),
        );
        Ok(seen)
    }

    fn capture_all(&mut self, after: &Cursor) -> Result<CaptureBatch, RestError> {
        let mut position = Position::of(after);
        let rescan = self.rescan;
        let recheck = std::mem::take(&mut self.recheck);
        let (calls, overflowed) = match &self.webhooks {
            Some(hooks) => hooks.drain(),
            None => (Vec::new(), false),
        };
        let seen = match self.look(&mut position, rescan || overflowed, &recheck, &calls) {
            Ok(seen) => seen,
            Err(e) => {
                // Nothing noted is dropped: looked at again next time.
                self.recheck.extend(recheck);
                if let Some(hooks) = &self.webhooks {
                    hooks.requeue(calls);
                }
                return Err(e);
            }
        };
        // The diff against the shadow, each record once, in its latest state.
        let mut last: HashMap<(usize, String), usize> = HashMap::new();
        for (i, (c, id, _)) in seen.iter().enumerate() {
            last.insert((*c, id.clone()), i);
        }
        let mut changes = Vec::new();
        let mut staged = Vec::new();
        for (i, (c, id, record)) in seen.into_iter().enumerate() {
            if last.get(&(c, id.clone())) != Some(&i) {
                continue;
            }
            let name = self.collections[c].spec.collection.clone();
            let known = self.shadow.get(&name, &id)?;
            let body = record.as_ref().map(|r| self.body_of(c, r));
            if body == known && !rescan {
                continue;
            }
            let state = match &record {
                None if known.is_none() => continue,
                None => RowState::Absent,
                Some(record) => self.state_of(c, &id, record),
            };
            staged.push((name.clone(), id.clone(), body));
            changes.push(CapturedChange {
                collection: name,
                key: id,
                previous_key: None,
                state,
            });
        }
        self.rescan = false;
        let moved = position.since != Position::of(after).since;
        if changes.is_empty() && !moved {
            return Ok(CaptureBatch {
                changes,
                cursor: after.clone(),
                rescan: false,
            });
        }
        position.seq = self.shadow.next_seq(position.seq);
        self.shadow.stage(position.seq, staged);
        Ok(CaptureBatch {
            changes,
            cursor: position.cursor(),
            rescan,
        })
    }

    fn id_of(&self, c: usize, record: &serde_json::Value) -> Option<String> {
        record
            .get(&self.collections[c].spec.primary_key)
            .and_then(webhook::id_text)
    }

    fn updated_of(&self, c: usize, record: &serde_json::Value) -> Option<i64> {
        let text = record.get(&self.collections[c].api.updated)?.as_str()?;
        parse_timestamp(text).map(|t| t.micros())
    }

    /// What the shadow keeps of a record: its synced fields as JSON text.
    fn body_of(&self, c: usize, record: &serde_json::Value) -> String {
        synced_body(&self.collections[c].spec.columns, record)
    }

    /// A fetched record as the agent sees it.
    fn state_of(&self, c: usize, id: &str, record: &serde_json::Value) -> RowState {
        let collection = &self.collections[c];
        let mut fields = Record::new();
        for column in &collection.spec.columns {
            let json = record
                .get(column)
                .cloned()
                .unwrap_or(serde_json::Value::Null);
            let declared = collection.declared.get(column).copied();
            match from_json_typed(json.clone(), declared) {
                Ok(value) => {
                    fields.insert(column.clone(), value);
                }
                Err(_) => {
                    let expected = declared.unwrap_or(FieldType::Json);
                    return RowState::Invalid(InvalidValue {
                        table: collection.spec.table.clone(),
                        key: shorten(id),
                        column: column.clone(),
                        found: shorten(&json.to_string()),
                        expected,
                        declared: format!("declared {expected} in the config"),
                    });
                }
            }
        }
        RowState::Present(fields)
    }
}

/// The synced fields of a record as canonical JSON text (keys sorted).
fn synced_body(columns: &[String], record: &serde_json::Value) -> String {
    let fields: BTreeMap<&str, &serde_json::Value> = columns
        .iter()
        .map(|c| {
            (
                c.as_str(),
                record.get(c).unwrap_or(&serde_json::Value::Null),
            )
        })
        .collect();
    serde_json::to_string(&fields).unwrap_or_default()
}

/// The address of a request: `template` rendered with `vars`, under `base`.
fn render_url(
    env: &minijinja::Environment<'static>,
    base: &str,
    collection: &str,
    setting: &str,
    template: &str,
    vars: impl Serialize,
) -> Result<String, RestError> {
    let path = env
        .render_str(template, vars)
        .map_err(|e| RestError::Config {
            collection: collection.to_owned(),
            setting: setting.to_owned(),
            message: template_message(&e),
        })?;
    Ok(format!(
        "{}/{}",
        base.trim_end_matches('/'),
        path.trim_start_matches('/')
    ))
}

/// The error of a request task that ended without an answer (it panicked).
fn lost_task(collection: &str) -> RestError {
    RestError::Answer {
        collection: collection.to_owned(),
        message: "a request ended without an answer".to_owned(),
    }
}

/// Runs `futures` at most `limit` at a time; their outputs in order (`None` for
/// one whose task panicked).
async fn run_all<F, T>(limit: usize, futures: impl Iterator<Item = F>) -> Vec<Option<T>>
where
    F: Future<Output = T> + 'static,
    T: 'static,
{
    let mut pending: Vec<Option<T>> = Vec::new();
    let mut running = tokio::task::JoinSet::new();
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            for (i, future) in futures.enumerate() {
                pending.push(None);
                if running.len() >= limit.max(1)
                    && let Some(Ok((j, out))) = running.join_next().await
                {
                    pending[j] = Some(out);
                }
                running.spawn_local(async move { (i, future.await) });
            }
            while let Some(done) = running.join_next().await {
                if let Ok((j, out)) = done {
                    pending[j] = Some(out);
                }
            }
        })
        .await;
    pending
}

/// What one op needs, decided before any request.
#[derive(Debug)]
enum Planned {
    /// Already decided.
    Done(OpOutcome),
    /// Requests to send.
    Send(Job),
}

/// One op's requests.
#[derive(Debug)]
struct Job {
    c: usize,
    kind: JobKind,
}

#[derive(Debug)]
enum JobKind {
    /// Create a record; the app assigns its id.
    Insert { token: String, create: Request },
    /// Fetch the record (`get`) and check it is as captured (`expected`), then
    /// `update` it, or `create` it with its id when the app has none.
    Upsert {
        key: String,
        expected: Option<String>,
        get: String,
        update: Request,
        create: Request,
    },
    /// Fetch the record and check it is as captured, then `delete` it.
    Delete {
        key: String,
        expected: Option<String>,
        get: String,
        delete: Request,
    },
}

/// What a job did.
#[derive(Debug)]
enum Done {
    Outcome(OpOutcome),
    /// Written: the record's key and its state in the app after (`None`: deleted).
    Wrote {
        c: usize,
        key: String,
        token: Option<String>,
        record: Option<serde_json::Value>,
    },
    /// The record changed in the app since it was captured: capture it first.
    Recheck {
        c: usize,
        key: String,
    },
}

/// What a job's requests need to know of the collection.
#[derive(Debug, Clone)]
struct Shape {
    collection: String,
    table: String,
    columns: Vec<String>,
    primary_key: String,
    record: String,
}

impl Shape {
    fn record_in(&self, reply: &Reply) -> Option<serde_json::Value> {
        match reply.json.pointer(&self.record) {
            Some(record @ serde_json::Value::Object(_)) => Some(record.clone()),
            _ => None,
        }
    }

    fn refused(&self, key: &str, reply: &Reply) -> Done {
        Done::Outcome(OpOutcome::Rejected(Rejection::Refused {
            tool: "the app".to_owned(),
            table: self.table.clone(),
            key: shorten(key),
            message: reply.message(),
        }))
    }

    fn error(&self, message: String) -> RestError {
        RestError::Answer {
            collection: self.collection.clone(),
            message,
        }
    }

    /// The record at `get`, as the app holds it now (`None`: it has none).
    async fn fetch(
        &self,
        sender: &Sender,
        key: &str,
        get: String,
    ) -> Result<Option<serde_json::Value>, RestError> {
        let reply = sender
            .send(Request {
                method: Method::GET,
                url: get,
                body: None,
            })
            .await?;
        if reply.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !reply.status.is_success() {
            return Err(self.error(format!(
                "fetching record {key} was answered {}",
                reply.message()
            )));
        }
        self.record_in(&reply).map(Some).ok_or_else(|| {
            self.error(format!(
                "fetching record {key}: no record at `{}`",
                self.record
            ))
        })
    }

    /// The synced fields of the record at `get` (`None`: the app has none).
    async fn fetch_body(
        &self,
        sender: &Sender,
        key: &str,
        get: String,
    ) -> Result<Option<String>, RestError> {
        Ok(self
            .fetch(sender, key, get)
            .await?
            .map(|record| synced_body(&self.columns, &record)))
    }
}

/// Runs one job against the app.
async fn run_job(sender: Sender, shape: Shape, job: Job) -> Result<Done, RestError> {
    let c = job.c;
    match job.kind {
        JobKind::Insert { token, create } => {
            run_create(&sender, &shape, c, "(new)", Some(token), create).await
        }
        JobKind::Upsert {
            key,
            expected,
            get,
            update,
            create,
        } => {
            let now = shape.fetch_body(&sender, &key, get.clone()).await?;
            if now != expected {
                return Ok(Done::Recheck { c, key });
            }
            if now.is_none() {
                return run_create(&sender, &shape, c, &key, None, create).await;
            }
            let reply = sender.send(update).await?;
            Ok(match reply.status {
                s if s.is_success() => {
                    // An app that answers an update without the record: read it.
                    let record = match shape.record_in(&reply) {
                        Some(record) => Some(record),
                        None => shape.fetch(&sender, &key, get).await?,
                    };
                    Done::Wrote {
                        c,
                        key,
                        token: None,
                        record,
                    }
                }
                StatusCode::NOT_FOUND | StatusCode::PRECONDITION_FAILED => Done::Recheck { c, key },
                s if s.is_client_error() => shape.refused(&key, &reply),
                _ => {
                    return Err(shape.error(format!(
                        "updating record {key} was answered {}",
                        reply.message()
                    )));
                }
            })
        }
        JobKind::Delete {
            key,
            expected,
            get,
            delete,
        } => {
            let gone = Done::Wrote {
                c,
                key: key.clone(),
                token: None,
                record: None,
            };
            match shape.fetch_body(&sender, &key, get).await? {
                // Not in the app (deleted there too, or never created): done.
                None => return Ok(gone),
                Some(now) if Some(&now) != expected.as_ref() => {
                    return Ok(Done::Recheck { c, key });
                }
                Some(_) => {}
            }
            let reply = sender.send(delete).await?;
            Ok(match reply.status {
                s if s.is_success() || s == StatusCode::NOT_FOUND => gone,
                StatusCode::PRECONDITION_FAILED => Done::Recheck { c, key },
                s if s.is_client_error() => shape.refused(&key, &reply),
                _ => {
                    return Err(shape.error(format!(
                        "deleting record {key} was answered {}",
                        reply.message()
                    )));
                }
            })
        }
    }
}

/// Creates a record (`shown` names it in messages); the app's answer gives its id.
async fn run_create(
    sender: &Sender,
    shape: &Shape,
    c: usize,
    shown: &str,
    token: Option<String>,
    create: Request,
) -> Result<Done, RestError> {
    let reply = sender.send(create).await?;
    if reply.status.is_client_error() {
        return Ok(shape.refused(shown, &reply));
    }
    if !reply.status.is_success() {
        return Err(shape.error(format!(
            "creating record {shown} was answered {}",
            reply.message()
        )));
    }
    let record = shape.record_in(&reply).ok_or_else(|| {
        shape.error(format!(
            "creating a record: no record at `{}` in the answer",
            shape.record
        ))
    })?;
    let id = record
        .get(&shape.primary_key)
        .and_then(webhook::id_text)
        .ok_or_else(|| {
            shape.error(format!(
                "the created record has no id in `{}`",
                shape.primary_key
            ))
        })?;
    Ok(Done::Wrote {
        c,
        key: id,
        token,
        record: Some(record),
    })
}

/// Where the shadow keeps the id an insert's token created.
fn token_name(collection: &str, token: &str) -> String {
    format!("token:{collection}:{token}")
}

/// Places `fields` at the JSON pointer `at` of an empty body.
fn request_body(at: &str, fields: serde_json::Value) -> serde_json::Value {
    let mut body = fields;
    for part in at.split('/').skip(1).collect::<Vec<_>>().into_iter().rev() {
        let name = part.replace("~1", "/").replace("~0", "~");
        body = serde_json::Value::Object([(name, body)].into_iter().collect());
    }
    body
}

impl RestConnector {
    fn shape(&self, c: usize) -> Shape {
        let collection = &self.collections[c];
        Shape {
            collection: collection.spec.collection.clone(),
            table: collection.spec.table.clone(),
            columns: collection.spec.columns.clone(),
            primary_key: collection.spec.primary_key.clone(),
            record: collection.api.record.clone(),
        }
    }

    /// The fields of an op as the app's JSON; a field that is not a column is a
    /// rejection.
    fn fields_json(
        &self,
        c: usize,
        key: &str,
        fields: &Record,
    ) -> Result<serde_json::Value, Rejection> {
        let collection = &self.collections[c];
        let mut out = serde_json::Map::new();
        for (name, value) in fields {
            if !collection.field_types.contains_key(name) {
                return Err(Rejection::UnknownColumn {
                    table: collection.spec.table.clone(),
                    key: shorten(key),
                    field: name.clone(),
                });
            }
            out.insert(name.clone(), to_json_lenient(value));
        }
        Ok(serde_json::Value::Object(out))
    }

    /// Decides what `op` needs, before any request.
    fn plan(&self, changed_since: &HashSet<RecordKey>, op: &WriteOp) -> Result<Planned, RestError> {
        let Some(c) = self
            .collections
            .iter()
            .position(|c| c.spec.collection == op.collection())
        else {
            return Ok(Planned::Done(OpOutcome::Rejected(
                Rejection::UnknownCollection {
                    collection: op.collection().to_owned(),
                },
            )));
        };
        let collection = &self.collections[c];
        let name = &collection.spec.collection;
        if let Some(key) = op.key()
            && changed_since.contains(&(name.clone(), key.to_owned()))
        {
            return Ok(Planned::Done(OpOutcome::Stale));
        }
        let request =
            |line: &Line, setting: &str, key: Option<&str>, body: Option<serde_json::Value>| {
                let url = match key {
                    Some(key) => self.record_url(c, setting, &line.path, key)?,
                    None => self.url(c, setting, &line.path, minijinja::context! {})?,
                };
                Ok::<_, RestError>(Request {
                    method: line.method.clone(),
                    url,
                    body: body.map(|fields| request_body(&collection.api.body, fields)),
                })
            };
        let kind = match op {
            WriteOp::Insert { token, fields, .. } => {
                if let Some(id) = self.shadow.meta(&token_name(name, token))? {
                    return Ok(Planned::Done(OpOutcome::Written {
                        key: Some(id),
                        version: None,
                    }));
                }
                let json = match self.fields_json(c, token, fields) {
                    Ok(json) => json,
                    Err(rejection) => return Ok(Planned::Done(OpOutcome::Rejected(rejection))),
                };
                JobKind::Insert {
                    token: token.clone(),
                    create: request(&collection.create, "create", None, Some(json))?,
                }
            }
            WriteOp::Upsert { key, fields, .. } => {
                let json = match self.fields_json(c, key, fields) {
                    Ok(json) => json,
                    Err(rejection) => return Ok(Planned::Done(OpOutcome::Rejected(rejection))),
                };
                let mut with_id = json.clone();
                if let serde_json::Value::Object(map) = &mut with_id {
                    map.insert(
                        collection.spec.primary_key.clone(),
                        serde_json::Value::String(key.clone()),
                    );
                }
                JobKind::Upsert {
                    key: key.clone(),
                    expected: self.shadow.get(name, key)?,
                    get: self.record_url(c, "get", &collection.api.get, key)?,
                    update: request(&collection.update, "update", Some(key), Some(json))?,
                    create: request(&collection.create, "create", None, Some(with_id))?,
                }
            }
            WriteOp::Delete { key, .. } => JobKind::Delete {
                key: key.clone(),
                expected: self.shadow.get(name, key)?,
                get: self.record_url(c, "get", &collection.api.get, key)?,
                delete: request(&collection.delete, "delete", Some(key), None)?,
            },
        };
        Ok(Planned::Send(Job { c, kind }))
    }

    fn write_all(
        &mut self,
        changed_since: &HashSet<RecordKey>,
        ops: &[WriteOp],
    ) -> Result<Vec<OpOutcome>, RestError> {
        let mut outcomes: Vec<Option<OpOutcome>> = vec![None; ops.len()];
        let mut jobs = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            match self.plan(changed_since, op)? {
                Planned::Done(outcome) => outcomes[i] = Some(outcome),
                Planned::Send(job) => jobs.push((i, job)),
            }
        }
        let sender = self.api.sender();
        let shapes: Vec<Shape> = (0..self.collections.len()).map(|c| self.shape(c)).collect();
        let indexes: Vec<usize> = jobs.iter().map(|(i, _)| *i).collect();
        let of_collection: Vec<usize> = jobs.iter().map(|(_, job)| job.c).collect();
        let results = self.api.block_on(run_all(
            self.api.concurrency,
            jobs.into_iter()
                .map(|(_, job)| run_job(sender.clone(), shapes[job.c].clone(), job)),
        ));
        let mut failure = None;
        let (mut written, mut tokens) = (Vec::new(), Vec::new());
        for ((i, result), c) in indexes.into_iter().zip(results).zip(of_collection) {
            let result =
                result.unwrap_or_else(|| Err(lost_task(&self.collections[c].spec.collection)));
            match result {
                Ok(Done::Outcome(outcome)) => outcomes[i] = Some(outcome),
                Ok(Done::Recheck { c, key }) => {
                    self.recheck.push((c, key));
                    outcomes[i] = Some(OpOutcome::Stale);
                }
                Ok(Done::Wrote {
                    c,
                    key,
                    token,
                    record,
                }) => {
                    let name = self.collections[c].spec.collection.clone();
                    let body = record.as_ref().map(|r| self.body_of(c, r));
                    let version = record
                        .as_ref()
                        .and_then(|r| r.get(&self.collections[c].api.updated))
                        .and_then(|u| u.as_str())
                        .map(str::to_owned);
                    if let Some(token) = &token {
                        tokens.push((token_name(&name, token), key.clone()));
                    }
                    written.push((name, key.clone(), body));
                    outcomes[i] = Some(OpOutcome::Written {
                        key: token.is_some().then_some(key),
                        version,
                    });
                }
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        // What was written is recorded even when another op failed: a retried
        // insert then finds its record.
        self.shadow.written(&written, &tokens)?;
        if let Some(e) = failure {
            return Err(e);
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.unwrap_or(OpOutcome::Stale))
            .collect())
    }
}

fn connector_error(e: RestError) -> ConnectorError {
    ConnectorError(Box::new(e))
}

impl Connector for RestConnector {
    fn kind(&self) -> &'static str {
        "rest"
    }

    fn change_feed(&self) -> ChangeFeed {
        match &self.webhooks {
            Some(_) => ChangeFeed::Push {
                fallback: self.poll_interval,
            },
            None => ChangeFeed::Poll {
                interval: self.poll_interval,
                idle: self.poll_interval,
            },
        }
    }

    fn field_types(&self, collection: &str) -> Option<&BTreeMap<String, FieldType>> {
        self.collections
            .iter()
            .find(|c| c.spec.collection == collection)
            .map(|c| &c.field_types)
    }

    fn subscribe(&mut self, wake: Wake) -> Result<(), ConnectorError> {
        if let Some(hooks) = &self.webhooks {
            hooks.subscribe(wake);
        }
        Ok(())
    }

    fn assigns_keys(&self, _collection: &str) -> bool {
        true
    }

    fn claim(&mut self, store: &[u8]) -> Result<(), ConnectorError> {
        if self
            .shadow
            .claim(store)
            .map_err(|e| connector_error(e.into()))?
        {
            self.rescan = true;
        }
        Ok(())
    }

    fn changed(&mut self) -> Result<bool, ConnectorError> {
        let now = Instant::now();
        Ok(self.rescan
            || !self.recheck.is_empty()
            || self.webhooks.as_ref().is_some_and(|h| h.pending())
            || now >= self.next_poll
            || now >= self.next_reconcile)
    }

    fn capture(&mut self, after: &Cursor, _max: usize) -> Result<CaptureBatch, ConnectorError> {
        self.capture_all(after).map_err(connector_error)
    }

    fn acknowledge(&mut self, durable: &Cursor) -> Result<(), ConnectorError> {
        self.shadow
            .acknowledge(Position::of(durable).seq)
            .map_err(|e| connector_error(e.into()))
    }

    fn write_back(
        &mut self,
        _captured: &Cursor,
        changed_since: &HashSet<RecordKey>,
        ops: &[WriteOp],
    ) -> Result<Vec<OpOutcome>, ConnectorError> {
        self.write_all(changed_since, ops).map_err(connector_error)
    }
}

/// What a configuration check learns of each collection: one list request each,
/// changing nothing.
pub fn inspect(
    config: &RestConfig,
    collections: Vec<RestCollection>,
) -> Result<Vec<TableSchema>, RestError> {
    let collections = compile(collections)?;
    let api = Api::new(config.auth.clone(), config.timeout, 1)?;
    let env = templates();
    let mut out = Vec::new();
    for collection in &collections {
        let since = chrono::DateTime::<chrono::Utc>::from_timestamp_micros(0)
            .unwrap_or_default()
            .format(&collection.api.since_format)
            .to_string();
        let vars = ListVars {
            since,
            page: 1,
            offset: 0,
            limit: 1,
            cursor: String::new(),
        };
        let url = render_url(
            &env,
            &config.url,
            &collection.spec.collection,
            "list",
            &collection.api.list,
            vars,
        )?;
        let reply = api.send(Request {
            method: Method::GET,
            url,
            body: None,
        })?;
        if !reply.status.is_success()
            || reply
                .json
                .pointer(&collection.api.records)
                .is_none_or(|r| !r.is_array())
        {
            return Err(RestError::Answer {
                collection: collection.spec.collection.clone(),
                message: format!(
                    "the list request was answered {} without an array of records at `{}`",
                    reply.message(),
                    collection.api.records
                ),
            });
        }
        out.push(TableSchema {
            assigns_keys: true,
            field_types: collection.field_types.clone(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_go_where_the_body_pointer_says() {
        let fields = serde_json::json!({"name": "Ada"});
        assert_eq!(request_body("", fields.clone()), fields);
        assert_eq!(
            request_body("/data/attributes", fields.clone()),
            serde_json::json!({"data": {"attributes": {"name": "Ada"}}})
        );
    }

    #[test]
    fn templates_encode_values_and_refuse_unknown_names() {
        let env = templates();
        let url = env
            .render_str(
                "/r?filter=(updated>='{{ since }}')&page={{ page }}",
                minijinja::context! { since => "2026-11-24 10:00:00.000Z", page => 2 },
            )
            .expect("renders");
        assert_eq!(
            url,
            "/r?filter=(updated>='2026-11-24%2010%3A00%3A00.000Z')&page=2"
        );
        let spec = CollectionSpec {
            collection: "customers".into(),
            table: "customers".into(),
            primary_key: "id".into(),
            columns: vec!["name".into()],
        };
        let api = RestApi {
            list: "/r?since={{ sincee }}".into(),
            get: "/r/{{ id }}".into(),
            create: "POST /r".into(),
            update: "PATCH /r/{{ id }}".into(),
            delete: "DELETE /r/{{ id }}".into(),
            records: "/items".into(),
            record: String::new(),
            body: String::new(),
            updated: "updated".into(),
            since_format: SINCE_FORMAT_DEFAULT.into(),
            pagination: Pagination::Page,
            page_size: 10,
            next_cursor: String::new(),
        };
        let err = compile(vec![RestCollection {
            spec: spec.clone(),
            types: BTreeMap::new(),
            api: api.clone(),
        }])
        .expect_err("an unknown variable");
        assert!(
            err.to_string()
                .starts_with("collection `customers`: `list`: undefined value"),
            "{err}"
        );
        let bad_line = RestApi {
            list: "/r".into(),
            update: "/r/{{ id }}".into(),
            ..api
        };
        let err = compile(vec![RestCollection {
            spec,
            types: BTreeMap::new(),
            api: bad_line,
        }])
        .expect_err("no method");
        assert!(
            err.to_string()
                .contains("`update`: `/r/{{ id }}` is not `METHOD path`"),
            "{err}"
        );
    }

    #[test]
    fn the_synced_body_ignores_other_fields_and_orders_keys() {
        let columns = vec!["name".to_owned(), "email".to_owned()];
        let a = serde_json::json!({"name": "Ada", "email": "a@x", "updated": "1"});
        let b = serde_json::json!({"email": "a@x", "updated": "2", "name": "Ada"});
        assert_eq!(synced_body(&columns, &a), synced_body(&columns, &b));
    }
}
