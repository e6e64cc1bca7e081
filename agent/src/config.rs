//! The agent's configuration file (TOML).
//!
//! Every table refuses unknown keys, and every error names the file, the line and
//! the field, so a typo never silently turns a setting off.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::identity::PeerId;

/// A configuration that cannot be used, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not fit the schema (names line and field).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line, column and field.
        message: String,
    },
    /// A value is well-formed but not acceptable.
    #[error("{path}:{line}: `{field}`: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The line of the offending value (1-based).
        line: usize,
        /// The field's dotted name.
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the agent keeps its store (relative paths are relative to the file).
    pub data_dir: PathBuf,
    /// The agent's key and certificate, made by `concord init`.
    pub key_file: PathBuf,
    /// The UDP address to listen on for peers.
    pub listen: SocketAddr,
    /// The peers this agent trusts; any other is refused.
    #[serde(default, rename = "peer")]
    pub peers: Vec<PeerConfig>,
    /// The tools this agent keeps in sync; none makes the agent a hub.
    #[serde(default, rename = "tool")]
    pub tools: Vec<ToolConfig>,
    /// Settings of a collection shared by all its tools (its natural key); a hub
    /// relays every collection listed here, and an agent with tools relays those
    /// besides its tools' own.
    #[serde(default, rename = "collection")]
    pub collections: Vec<SharedCollection>,
    /// The shape before `[[tool]]`: refused with what to write instead.
    #[serde(default)]
    sqlite: Option<toml::Value>,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// The admin HTTP API that `concord conflicts`, `deletes`, `dead-letters` and
    /// `history` talk to.
    #[serde(default)]
    pub admin: AdminConfig,
    /// The file this was read from (set by [`Config::load`]).
    #[serde(skip)]
    pub path: PathBuf,
    /// The file's text, to turn spans into line numbers.
    #[serde(skip)]
    source: String,
}

/// One trusted peer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// The peer's id, as printed by its `concord init`.
    pub id: Spanned<String>,
    /// Where to dial it; without one the agent only accepts its calls.
    #[serde(default)]
    pub addr: Option<SocketAddr>,
}

/// One tool: a database or an application whose records this agent syncs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolConfig {
    /// The tool's name, unique in this agent (letters, digits, `-` and `_`).
    pub name: Spanned<String>,
    /// What kind of tool it is.
    pub kind: Spanned<ToolKind>,
    /// `sqlite`: the database file. `csv`: the folder of the files.
    #[serde(default)]
    pub path: Option<Spanned<PathBuf>>,
    /// `postgres`: the connection string (`postgresql://user:password@host:port/db`
    /// or `host=... port=... user=... dbname=...`). `caldav`: the server. `rest`:
    /// the API's base address.
    #[serde(default)]
    pub url: Option<Spanned<String>>,
    /// `postgres`: how often to look for changes when no notification came, in
    /// milliseconds (default 1000). `caldav`: how often to poll each calendar
    /// (default 2000). `rest`: how often to poll the list endpoints (default 5000;
    /// with webhooks, the fallback). `csv`: how often to look at the files when no
    /// file event came (default 5000).
    #[serde(default)]
    pub poll_interval_ms: Option<Spanned<u64>>,
    /// `caldav`, `rest`: the user for basic auth.
    #[serde(default)]
    pub user: Option<Spanned<String>>,
    /// `caldav`, `rest`: the password for basic auth (never logged).
    #[serde(default)]
    pub password: Option<Spanned<String>>,
    /// `caldav`, `rest`: an environment variable holding the password, instead of
    /// `password`.
    #[serde(default)]
    pub password_env: Option<Spanned<String>>,
    /// `rest`: a bearer token (never logged).
    #[serde(default)]
    pub token: Option<Spanned<String>>,
    /// `rest`: an environment variable holding the bearer token, instead of `token`.
    #[serde(default)]
    pub token_env: Option<Spanned<String>>,
    /// `rest`: how far back each poll starts before the latest update seen, in
    /// milliseconds, for clocks of app and agent that differ (default 5000).
    #[serde(default)]
    pub overlap_ms: Option<Spanned<u64>>,
    /// `rest`: how often every id is listed to find deletes no webhook told of, in
    /// milliseconds (default 300000).
    #[serde(default)]
    pub reconcile_interval_ms: Option<Spanned<u64>>,
    /// `rest`: requests in flight at most (default 4).
    #[serde(default)]
    pub concurrency: Option<Spanned<usize>>,
    /// `rest`: how long one request may take, in milliseconds (default 30000).
    #[serde(default)]
    pub timeout_ms: Option<Spanned<u64>>,
    /// `rest`: the app calls the agent's webhook endpoint `/hooks/<tool name>`.
    #[serde(default)]
    pub webhook: Option<WebhookConfig>,
    /// `csv`: how long the files must be quiet after a change before they are
    /// read, in milliseconds (default 300).
    #[serde(default)]
    pub debounce_ms: Option<Spanned<u64>>,
    /// The collections synced with this tool.
    #[serde(default, rename = "collection")]
    pub collections: Vec<CollectionConfig>,
}

/// A `rest` tool's webhook endpoint, served by the agent's HTTP server (the admin
/// API's address) at `/hooks/<tool name>`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// The shared secret the app signs bodies with (HMAC-SHA256; never logged).
    #[serde(default)]
    pub secret: Option<Spanned<String>>,
    /// An environment variable holding the secret, instead of `secret`.
    #[serde(default)]
    pub secret_env: Option<Spanned<String>>,
    /// The header carrying the signature: hex, optionally `sha256=`-prefixed
    /// (default `X-Concord-Signature`).
    #[serde(default)]
    pub header: Option<Spanned<String>>,
    /// The JSON pointer to the record's id in a call (default `/record/id`).
    #[serde(default)]
    pub id: Option<Spanned<String>>,
    /// The JSON pointer to the collection's name in a call (default
    /// `/collection`; `""` when calls name none, for a tool of one collection).
    #[serde(default)]
    pub collection: Option<Spanned<String>>,
}

/// How a `rest` collection's API looks: request templates (`{{ id }}`,
/// `{{ since }}`, `{{ page }}`, `{{ offset }}`, `{{ limit }}`, `{{ cursor }}`;
/// values are percent-encoded) and JSON pointers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestApiConfig {
    /// The list request: path and query, with the updated-since filter, the sort
    /// by updated-at and the page.
    pub list: Spanned<String>,
    /// The path of one record.
    pub get: Spanned<String>,
    /// `METHOD path` creating a record.
    pub create: Spanned<String>,
    /// `METHOD path` updating a record.
    pub update: Spanned<String>,
    /// `METHOD path` deleting a record.
    pub delete: Spanned<String>,
    /// Where the records are in a list answer (default `""`: the answer is the array).
    #[serde(default)]
    pub records: String,
    /// Where the record is in an answer about one record (default `""`: the answer).
    #[serde(default)]
    pub record: String,
    /// Where the fields go in a request body (default `""`: the body is the fields).
    #[serde(default)]
    pub body: String,
    /// The field holding when a record last changed (default `updated`).
    #[serde(default)]
    pub updated: Option<String>,
    /// How `{{ since }}` is written, strftime in UTC (default
    /// `%Y-%m-%dT%H:%M:%S%.3fZ`).
    #[serde(default)]
    pub since_format: Option<String>,
    /// `page` (default), `offset` or `cursor`.
    #[serde(default)]
    pub pagination: connectors::rest::Pagination,
    /// Records per page (default 200).
    #[serde(default)]
    pub page_size: Option<Spanned<usize>>,
    /// Where a list answer names the next page's cursor (cursor pagination).
    #[serde(default)]
    pub next_cursor: String,
}

/// The kinds of tools Concord speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ToolKind {
    /// A SQLite database file.
    Sqlite,
    /// A PostgreSQL database.
    Postgres,
    /// A CalDAV server's calendars.
    Caldav,
    /// A web app's REST API.
    Rest,
    /// A folder of CSV files.
    Csv,
}

impl ToolKind {
    /// The kind as written in the config.
    pub fn name(self) -> &'static str {
        match self {
            ToolKind::Sqlite => "sqlite",
            ToolKind::Postgres => "postgres",
            ToolKind::Caldav => "caldav",
            ToolKind::Rest => "rest",
            ToolKind::Csv => "csv",
        }
    }
}

/// A collection's settings shared by every tool that syncs it: the same on every agent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedCollection {
    /// The collection's name, the same on every agent.
    pub name: Spanned<String>,
    /// Canonical fields whose normalised values identify a record: records with
    /// equal natural keys are one record, in every tool (e.g. `["email"]`).
    #[serde(default)]
    pub natural_key: Option<Spanned<Vec<String>>>,
    /// How each natural-key field is normalised before comparing (default
    /// `["trim", "lowercase"]`).
    #[serde(default)]
    pub normalize: BTreeMap<String, Spanned<Vec<Normalize>>>,
    /// How concurrent edits of one field settle (default `latest_edit`).
    #[serde(default)]
    pub conflicts: Option<Spanned<ConflictPolicy>>,
    /// For `conflicts = "system_of_record"`: the tool whose value wins, by its name
    /// (`erp`) or, where several agents have a tool of that name, its id in
    /// documents (`<first 8 characters of the agent's peer id>.erp`).
    #[serde(default)]
    pub system_of_record: Option<Spanned<String>>,
    /// Per-field overrides of `conflicts` and `system_of_record`.
    #[serde(default)]
    pub fields: BTreeMap<String, FieldPolicyConfig>,
    /// What settles a delete concurrent with an edit (default `delete_wins`).
    #[serde(default)]
    pub deletes: Option<Spanned<DeletePolicy>>,
    /// Tools of this agent whose deletes wait in the approval queue (`"*"`: all).
    #[serde(default)]
    pub hold_deletes: Option<Spanned<Vec<String>>>,
}

/// A field's own conflict policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldPolicyConfig {
    /// How concurrent edits of the field settle.
    pub conflicts: Spanned<ConflictPolicy>,
    /// For `system_of_record`: the tool whose value wins.
    #[serde(default)]
    pub system_of_record: Option<Spanned<String>>,
}

/// How concurrent edits of one field settle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConflictPolicy {
    /// The value with the latest edit time wins; ties go the same way on every agent.
    #[default]
    LatestEdit,
    /// The value from the named tool wins (latest edit among others without one).
    SystemOfRecord,
    /// The latest edit stays until a person picks a value; the conflict waits in a queue.
    Manual,
}

/// What settles a delete concurrent with an edit of the record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeletePolicy {
    /// The record stays deleted.
    #[default]
    DeleteWins,
    /// The record comes back, with the edit.
    EditWins,
}

/// The admin HTTP API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// The TCP address to serve on (default `127.0.0.1:0`: loopback, any free port;
    /// the agent writes the address it got to `admin-address` in its data folder).
    #[serde(default = "AdminConfig::default_listen")]
    pub listen: Spanned<SocketAddr>,
    /// The bearer token requests must carry; required when `listen` is not a
    /// loopback address.
    #[serde(default)]
    pub token: Option<Spanned<String>>,
}

impl AdminConfig {
    fn default_listen() -> Spanned<SocketAddr> {
        Spanned::new(0..0, SocketAddr::from(([127, 0, 0, 1], 0)))
    }
}

impl Default for AdminConfig {
    fn default() -> AdminConfig {
        AdminConfig {
            listen: AdminConfig::default_listen(),
            token: None,
        }
    }
}

/// One normalisation step of a natural-key value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalize {
    /// Leading and trailing white space removed, inner runs of it made one space.
    Trim,
    /// Lower case.
    Lowercase,
    /// Only the digits kept (phone numbers).
    Digits,
    /// Only letters and digits kept.
    Alphanumeric,
}

/// One synced table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectionConfig {
    /// The collection's name, the same on every agent.
    pub name: Spanned<String>,
    /// The table; for a `caldav` tool the calendar (`calendar` is the same
    /// setting): its name under the user's calendar home, or its path; for a
    /// `rest` tool the app's name of the collection (`resource`), as its webhooks
    /// name it; for a `csv` tool the file (`file`), in the tool's folder.
    #[serde(alias = "calendar", alias = "resource", alias = "file")]
    pub table: Spanned<String>,
    /// The table's primary key column (a `caldav` tool's events are keyed by `uid`;
    /// a `rest` record's id field defaults to `id`; a `csv` file's key column).
    #[serde(default)]
    pub primary_key: Option<Spanned<String>>,
    /// `rest`, `csv`: the types of columns, by name (`integer`, `float`, `decimal`,
    /// `text`, `bool`, `timestamp`, `json`). A `csv` column not listed is text; a
    /// `rest` field not listed is taken as its JSON holds it.
    #[serde(default)]
    pub types: BTreeMap<String, connectors::FieldType>,
    /// `csv`: the delimiter, one character (default: found from the header line).
    #[serde(default)]
    pub delimiter: Option<Spanned<String>>,
    /// `rest`: the collection's API.
    #[serde(default)]
    pub api: Option<RestApiConfig>,
    /// Columns synced as they are: the canonical field has the column's name, type
    /// and value.
    #[serde(default)]
    pub columns: Option<Spanned<Vec<String>>>,
    /// Columns mapped to canonical fields (renamed, converted, transformed, computed).
    #[serde(default, rename = "field")]
    pub fields: Vec<FieldConfig>,
    /// What makes two records the same: `tool_ids` (the default when the tool
    /// assigns the keys itself) or `shared_key` (the default otherwise); a
    /// collection with a `natural_key` is identified by it.
    #[serde(default)]
    pub identity: Option<Spanned<IdentityConfig>>,
    /// A CEL expression over canonical fields: the tool holds only the records for
    /// which it is true.
    #[serde(default)]
    pub filter: Option<Spanned<String>>,
    /// What happens in this tool to a record that stops matching `filter`: `remove`
    /// (default) deletes it from this tool only, `keep` leaves it in place.
    #[serde(default)]
    pub on_filter_exit: Option<Spanned<FilterExit>>,
    /// Whose values win when this tool's record is first linked to a record other
    /// tools already hold (natural keys): `others` (default), `tool`, or `newest`
    /// (field by field, by edit time; the tool's time is `changed_at`).
    #[serde(default)]
    pub on_match: Option<Spanned<MatchWins>>,
    /// A column holding when the row last changed (a timestamp, or text converted
    /// by its field mapping): the edit time of what is captured from the row.
    #[serde(default)]
    pub changed_at: Option<Spanned<String>>,
}

/// How one column maps to one canonical field.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldConfig {
    /// The tool's column.
    pub column: Spanned<String>,
    /// The canonical field (default: the column's name).
    #[serde(default)]
    pub field: Option<Spanned<String>>,
    /// `both` (default), `into_tool` (written into the tool, never read from it) or
    /// `out_of_tool` (read from the tool, never written into it).
    #[serde(default)]
    pub direction: Option<Spanned<Direction>>,
    /// A type conversion between the column and the field.
    #[serde(default)]
    pub convert: Option<Spanned<Conversion>>,
    /// `minor_units`: digits after the decimal point (default 2: cents).
    #[serde(default)]
    pub scale: Option<Spanned<u32>>,
    /// `timestamp`: the text's format (strftime; default RFC 3339).
    #[serde(default)]
    pub format: Option<Spanned<String>>,
    /// The time zone (IANA name) of local times in the column: text without an
    /// offset, or a timestamp column holding wall-clock time.
    #[serde(default)]
    pub timezone: Option<Spanned<String>>,
    /// `bool`: the column's value for true (default 1, or "Y" for text).
    #[serde(default)]
    pub true_value: Option<Spanned<toml::Value>>,
    /// `bool`: the column's value for false (default 0, or "N" for text).
    #[serde(default)]
    pub false_value: Option<Spanned<toml::Value>>,
    /// Units: the column holds the field's value times this factor (a decimal, as
    /// text or a number: `"1000"` for grams of a field in kilograms).
    #[serde(default)]
    pub factor: Option<Spanned<toml::Value>>,
    /// Enumerations: the column's values and the field's value for each.
    #[serde(default)]
    pub values: Option<Spanned<BTreeMap<String, String>>>,
    /// Enumerations: the field's value for a column value not in `values` (default:
    /// the value itself).
    #[serde(default)]
    pub default: Option<Spanned<String>>,
    /// Enumerations: the column's value for a field value not in `values` (default:
    /// the value itself).
    #[serde(default)]
    pub tool_default: Option<Spanned<String>>,
    /// Trim white space from both ends of the text, both ways.
    #[serde(default)]
    pub trim: Option<Spanned<bool>>,
    /// `upper` or `lower`: the case of text written into the tool.
    #[serde(default)]
    pub case: Option<Spanned<Case>>,
    /// The most characters the column holds: longer text is cut when written into
    /// the tool; the document keeps the whole text.
    #[serde(default)]
    pub max_length: Option<Spanned<usize>>,
    /// A CEL expression over canonical fields whose value is written into the
    /// column (a computed field; its direction is `into_tool`).
    #[serde(default)]
    pub compute: Option<Spanned<String>>,
}

/// Which way a field is synced, seen from the tool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Read from the tool and written into it.
    #[default]
    Both,
    /// Written into the tool; the tool's own edits of it are not read.
    IntoTool,
    /// Read from the tool; never written into it.
    OutOfTool,
}

/// A type conversion between a column and a canonical field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Conversion {
    /// An integer count of minor units (cents) ↔ an exact decimal.
    MinorUnits,
    /// Text in a format (and time zone) ↔ a timestamp.
    Timestamp,
    /// Two column values (`true_value`, `false_value`) ↔ a boolean.
    Bool,
    /// Text holding a number ↔ an exact decimal.
    Number,
    /// A number ↔ its text.
    Text,
}

/// The case of text written into a tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Case {
    /// Upper case.
    Upper,
    /// Lower case.
    Lower,
}

/// What a tool does with a record that stops matching its filter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FilterExit {
    /// The record is deleted from this tool only.
    #[default]
    Remove,
    /// The record stays in the tool and is no longer written.
    Keep,
}

/// Whose values win when a tool's record is first linked to an existing record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MatchWins {
    /// The values the other tools already hold.
    #[default]
    Others,
    /// This tool's values.
    Tool,
    /// Field by field, the value edited last.
    Newest,
}

/// The `identity` of a collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityConfig {
    /// Each tool keeps the ids it assigns.
    ToolIds,
    /// The key means the same record in every tool.
    SharedKey,
}

/// Logging settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (default) or `json`.
    #[serde(default)]
    pub format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl Config {
    /// Reads and checks the file at `path`; relative paths in it become relative to its folder.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let source = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(path, source)
    }

    /// Parses `source` as if read from `path`.
    pub fn parse(path: &Path, source: String) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(&source).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        config.path = path.to_owned();
        config.source = source;
        if config.sqlite.is_some() {
            return Err(ConfigError::Parse {
                path: path.to_owned(),
                message: OLD_SQLITE_SHAPE.to_owned(),
            });
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let absolute = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        absolute(&mut config.data_dir);
        absolute(&mut config.key_file);
        for tool in &mut config.tools {
            if let Some(p) = &mut tool.path {
                absolute(p.get_mut());
            }
            if *tool.kind.get_ref() == ToolKind::Caldav {
                // A calendar syncs every field of its events unless told otherwise.
                for c in &mut tool.collections {
                    if c.columns.is_none() && c.fields.is_empty() {
                        let span = c.name.span();
                        c.columns = Some(Spanned::new(span, connectors::caldav::all_fields()));
                    }
                }
            }
        }
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), ConfigError> {
        for (i, peer) in self.peers.iter().enumerate() {
            if let Err(e) = peer.id.get_ref().parse::<PeerId>() {
                return Err(self.invalid(peer.id.span(), format!("peer[{i}].id"), e.to_string()));
            }
        }
        if self.tools.is_empty() && self.collections.is_empty() {
            return Err(ConfigError::Parse {
                path: self.path.clone(),
                message: "nothing to sync: add a `[[tool]]` with its `[[tool.collection]]` \
                          tables, or, for a hub that only relays, a `[[collection]]` table \
                          per collection"
                    .to_owned(),
            });
        }
        for (t, tool) in self.tools.iter().enumerate() {
            self.check_tool(t, tool)?;
        }
        for (i, c) in self.collections.iter().enumerate() {
            self.check_collection_name(&c.name, format!("collection[{i}].name"))?;
            self.check_policies(i, c)?;
        }
        self.check_admin()
    }

    /// `system_of_record` goes with `conflicts = "system_of_record"`, and
    /// `hold_deletes` names tools of this agent.
    fn check_policies(&self, i: usize, c: &SharedCollection) -> Result<(), ConfigError> {
        let policies = std::iter::once((
            format!("collection[{i}]"),
            c.conflicts.as_ref(),
            c.system_of_record.as_ref(),
        ))
        .chain(c.fields.iter().map(|(field, p)| {
            (
                format!("collection[{i}].fields.{field}"),
                Some(&p.conflicts),
                p.system_of_record.as_ref(),
            )
        }));
        for (place, policy, tool) in policies {
            let is_sor = policy.is_some_and(|p| *p.get_ref() == ConflictPolicy::SystemOfRecord);
            match (is_sor, tool) {
                (true, None) => {
                    let span = policy.map_or(c.name.span(), Spanned::span);
                    return Err(self.invalid(
                        span,
                        format!("{place}.system_of_record"),
                        "`conflicts = \"system_of_record\"` needs `system_of_record`: the \
                         name of the tool whose value wins"
                            .to_owned(),
                    ));
                }
                (false, Some(tool)) => {
                    return Err(self.invalid(
                        tool.span(),
                        format!("{place}.system_of_record"),
                        "`system_of_record` is only read with `conflicts = \"system_of_record\"`"
                            .to_owned(),
                    ));
                }
                _ => {}
            }
        }
        if let Some(hold) = &c.hold_deletes {
            for name in hold.get_ref() {
                if name != "*" && !self.tools.iter().any(|t| t.name.get_ref() == name) {
                    return Err(self.invalid(
                        hold.span(),
                        format!("collection[{i}].hold_deletes"),
                        format!("no tool of this agent is named `{name}` (use `\"*\"` for all)"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// An admin API reachable from other machines must ask for a token.
    fn check_admin(&self) -> Result<(), ConfigError> {
        let listen = &self.admin.listen;
        if !listen.get_ref().ip().is_loopback()
            && self
                .admin
                .token
                .as_ref()
                .is_none_or(|t| t.get_ref().trim().is_empty())
        {
            return Err(self.invalid(
                listen.span(),
                "admin.token".to_owned(),
                format!(
                    "the admin API listens on {}, which is not a loopback address: set \
                     `token` so that only those who have it can use the API",
                    listen.get_ref()
                ),
            ));
        }
        Ok(())
    }

    fn check_tool(&self, t: usize, tool: &ToolConfig) -> Result<(), ConfigError> {
        let name = tool.name.get_ref();
        let valid = !name.is_empty()
            && name.len() <= TOOL_NAME_LEN_MAX
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid {
            return Err(self.invalid(
                tool.name.span(),
                format!("tool[{t}].name"),
                format!("a tool name has 1 to {TOOL_NAME_LEN_MAX} letters, digits, `-` or `_`"),
            ));
        }
        if self.tools[..t].iter().any(|o| o.name.get_ref() == name) {
            return Err(self.invalid(
                tool.name.span(),
                format!("tool[{t}].name"),
                format!("tool `{name}` is configured twice; tool names are unique in an agent"),
            ));
        }
        let misplaced = |span: Range<usize>, key: &str, kind: &str| {
            self.invalid(
                span,
                format!("tool[{t}].{key}"),
                format!("`{key}` is a setting of `{kind}` tools, and this tool is not one"),
            )
        };
        match tool.kind.get_ref() {
            ToolKind::Sqlite => {
                if tool.path.is_none() {
                    return Err(self.invalid(
                        tool.kind.span(),
                        format!("tool[{t}].path"),
                        "a `sqlite` tool needs `path`, the database file".to_owned(),
                    ));
                }
                if let Some(url) = &tool.url {
                    return Err(misplaced(
                        url.span(),
                        "url",
                        "postgres`, `caldav` and `rest",
                    ));
                }
                if let Some(poll) = &tool.poll_interval_ms {
                    return Err(misplaced(
                        poll.span(),
                        "poll_interval_ms",
                        "postgres`, `caldav`, `rest` and `csv",
                    ));
                }
            }
            ToolKind::Postgres => {
                if tool.url.is_none() {
                    return Err(self.invalid(
                        tool.kind.span(),
                        format!("tool[{t}].url"),
                        "a `postgres` tool needs `url`, the connection string \
                         (e.g. \"postgresql://user:password@127.0.0.1:5432/crm\")"
                            .to_owned(),
                    ));
                }
                if let Some(path) = &tool.path {
                    return Err(misplaced(path.span(), "path", "sqlite` and `csv"));
                }
                self.check_poll_interval(t, tool)?;
            }
            ToolKind::Caldav => {
                let Some(url) = &tool.url else {
                    return Err(self.invalid(
                        tool.kind.span(),
                        format!("tool[{t}].url"),
                        "a `caldav` tool needs `url`, the server's address \
                         (e.g. \"http://127.0.0.1:5232/\")"
                            .to_owned(),
                    ));
                };
                if !url.get_ref().starts_with("http://") {
                    return Err(self.invalid(
                        url.span(),
                        format!("tool[{t}].url"),
                        "a CalDAV address starts with `http://` (TLS to the calendar server is \
                         not built yet: reach it through a local TLS proxy)"
                            .to_owned(),
                    ));
                }
                if let Some(path) = &tool.path {
                    return Err(misplaced(path.span(), "path", "sqlite` and `csv"));
                }
                self.check_credentials(t, tool)?;
                self.check_poll_interval(t, tool)?;
                for (i, c) in tool.collections.iter().enumerate() {
                    if let Some(key) = &c.primary_key
                        && key.get_ref() != "uid"
                    {
                        return Err(self.invalid(
                            key.span(),
                            format!("tool[{t}].collection[{i}].primary_key"),
                            "events are keyed by `uid`; leave `primary_key` out".to_owned(),
                        ));
                    }
                }
            }
            ToolKind::Rest => {
                let Some(url) = &tool.url else {
                    return Err(self.invalid(
                        tool.kind.span(),
                        format!("tool[{t}].url"),
                        "a `rest` tool needs `url`, the API's base address \
                         (e.g. \"http://127.0.0.1:8090/\")"
                            .to_owned(),
                    ));
                };
                if !url.get_ref().starts_with("http://") && !url.get_ref().starts_with("https://") {
                    return Err(self.invalid(
                        url.span(),
                        format!("tool[{t}].url"),
                        "an API address starts with `http://` or `https://`".to_owned(),
                    ));
                }
                if let Some(path) = &tool.path {
                    return Err(misplaced(path.span(), "path", "sqlite` and `csv"));
                }
                if tool.token.is_some() && tool.token_env.is_some() {
                    let span = tool.token_env.as_ref().map_or(0..0, Spanned::span);
                    return Err(self.invalid(
                        span,
                        format!("tool[{t}].token_env"),
                        "give `token` or `token_env`, not both".to_owned(),
                    ));
                }
                if (tool.token.is_some() || tool.token_env.is_some()) && tool.user.is_some() {
                    let span = tool.user.as_ref().map_or(0..0, Spanned::span);
                    return Err(self.invalid(
                        span,
                        format!("tool[{t}].user"),
                        "give a bearer `token` or a `user` with a password, not both".to_owned(),
                    ));
                }
                self.check_credentials(t, tool)?;
                self.check_poll_interval(t, tool)?;
                if let Some(concurrency) = &tool.concurrency
                    && !(1..=CONCURRENCY_MAX).contains(concurrency.get_ref())
                {
                    return Err(self.invalid(
                        concurrency.span(),
                        format!("tool[{t}].concurrency"),
                        format!("between 1 and {CONCURRENCY_MAX} requests"),
                    ));
                }
                if let Some(hook) = &tool.webhook
                    && hook.secret.is_some() == hook.secret_env.is_some()
                {
                    return Err(self.invalid(
                        tool.name.span(),
                        format!("tool[{t}].webhook.secret"),
                        "webhooks are signed: give the shared secret in `secret` or \
                         `secret_env` (one of them)"
                            .to_owned(),
                    ));
                }
                for (i, c) in tool.collections.iter().enumerate() {
                    if c.api.is_none() {
                        return Err(self.invalid(
                            c.name.span(),
                            format!("tool[{t}].collection[{i}].api"),
                            "a `rest` collection needs `api`: its list, get, create, update \
                             and delete requests (see the README)"
                                .to_owned(),
                        ));
                    }
                }
            }
            ToolKind::Csv => {
                if tool.path.is_none() {
                    return Err(self.invalid(
                        tool.kind.span(),
                        format!("tool[{t}].path"),
                        "a `csv` tool needs `path`, the folder of its files".to_owned(),
                    ));
                }
                if let Some(url) = &tool.url {
                    return Err(misplaced(
                        url.span(),
                        "url",
                        "postgres`, `caldav` and `rest",
                    ));
                }
                self.check_poll_interval(t, tool)?;
                for (i, c) in tool.collections.iter().enumerate() {
                    if let Some(delimiter) = &c.delimiter
                        && delimiter.get_ref().len() != 1
                    {
                        return Err(self.invalid(
                            delimiter.span(),
                            format!("tool[{t}].collection[{i}].delimiter"),
                            "one ASCII character, e.g. \";\" or \"\\t\"".to_owned(),
                        ));
                    }
                }
            }
        }
        let kind = *tool.kind.get_ref();
        if !matches!(kind, ToolKind::Caldav | ToolKind::Rest) {
            for (key, value) in [
                ("user", &tool.user),
                ("password", &tool.password),
                ("password_env", &tool.password_env),
            ] {
                if let Some(value) = value {
                    return Err(misplaced(value.span(), key, "caldav` and `rest"));
                }
            }
        }
        if kind != ToolKind::Rest {
            for (key, span) in [
                ("token", tool.token.as_ref().map(Spanned::span)),
                ("token_env", tool.token_env.as_ref().map(Spanned::span)),
                ("overlap_ms", tool.overlap_ms.as_ref().map(Spanned::span)),
                (
                    "reconcile_interval_ms",
                    tool.reconcile_interval_ms.as_ref().map(Spanned::span),
                ),
                ("concurrency", tool.concurrency.as_ref().map(Spanned::span)),
                ("timeout_ms", tool.timeout_ms.as_ref().map(Spanned::span)),
            ] {
                if let Some(span) = span {
                    return Err(misplaced(span, key, "rest"));
                }
            }
            if tool.webhook.is_some() {
                return Err(misplaced(tool.kind.span(), "webhook", "rest"));
            }
            for (i, c) in tool.collections.iter().enumerate() {
                if c.api.is_some() {
                    return Err(self.invalid(
                        c.name.span(),
                        format!("tool[{t}].collection[{i}].api"),
                        "`api` is a setting of `rest` tools, and this tool is not one".to_owned(),
                    ));
                }
            }
        }
        if kind != ToolKind::Csv {
            if let Some(debounce) = &tool.debounce_ms {
                return Err(misplaced(debounce.span(), "debounce_ms", "csv"));
            }
            for (i, c) in tool.collections.iter().enumerate() {
                if let Some(delimiter) = &c.delimiter {
                    return Err(self.invalid(
                        delimiter.span(),
                        format!("tool[{t}].collection[{i}].delimiter"),
                        "`delimiter` is a setting of `csv` tools, and this tool is not one"
                            .to_owned(),
                    ));
                }
            }
        }
        if !matches!(kind, ToolKind::Rest | ToolKind::Csv) {
            for (i, c) in tool.collections.iter().enumerate() {
                if !c.types.is_empty() {
                    return Err(self.invalid(
                        c.name.span(),
                        format!("tool[{t}].collection[{i}].types"),
                        "`types` is a setting of `rest` and `csv` tools (other tools have \
                         types of their own)"
                            .to_owned(),
                    ));
                }
            }
        }
        if !matches!(kind, ToolKind::Caldav | ToolKind::Rest) {
            for (i, c) in tool.collections.iter().enumerate() {
                if c.primary_key.is_none() {
                    return Err(self.invalid(
                        c.table.span(),
                        format!("tool[{t}].collection[{i}].primary_key"),
                        "name the table's primary key column in `primary_key`".to_owned(),
                    ));
                }
            }
        }
        if tool.collections.is_empty() {
            return Err(self.invalid(
                tool.name.span(),
                format!("tool[{t}].collection"),
                "add at least one `[[tool.collection]]`".to_owned(),
            ));
        }
        for (i, c) in tool.collections.iter().enumerate() {
            self.check_collection_name(&c.name, format!("tool[{t}].collection[{i}].name"))?;
            let columns = c.columns.as_ref().map_or(0, |c| c.get_ref().len());
            if columns == 0 && c.fields.is_empty() {
                let span = c.columns.as_ref().map_or(c.name.span(), Spanned::span);
                return Err(self.invalid(
                    span,
                    format!("tool[{t}].collection[{i}].columns"),
                    "list at least one column in `columns` or a `[[tool.collection.field]]`"
                        .to_owned(),
                ));
            }
            let dup = tool.collections[..i]
                .iter()
                .any(|o| o.name.get_ref() == c.name.get_ref());
            if dup {
                return Err(self.invalid(
                    c.name.span(),
                    format!("tool[{t}].collection[{i}].name"),
                    format!(
                        "collection `{}` is configured twice for this tool",
                        c.name.get_ref()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `password` or `password_env`, not both, and either with a `user`.
    fn check_credentials(&self, t: usize, tool: &ToolConfig) -> Result<(), ConfigError> {
        if tool.password.is_some() && tool.password_env.is_some() {
            let span = tool.password_env.as_ref().map_or(0..0, Spanned::span);
            return Err(self.invalid(
                span,
                format!("tool[{t}].password_env"),
                "give `password` or `password_env`, not both".to_owned(),
            ));
        }
        if (tool.password.is_some() || tool.password_env.is_some()) && tool.user.is_none() {
            return Err(self.invalid(
                tool.kind.span(),
                format!("tool[{t}].user"),
                "a password needs a `user`".to_owned(),
            ));
        }
        Ok(())
    }

    fn check_poll_interval(&self, t: usize, tool: &ToolConfig) -> Result<(), ConfigError> {
        if let Some(poll) = &tool.poll_interval_ms
            && !(POLL_INTERVAL_MS_MIN..=POLL_INTERVAL_MS_MAX).contains(poll.get_ref())
        {
            return Err(self.invalid(
                poll.span(),
                format!("tool[{t}].poll_interval_ms"),
                format!("between {POLL_INTERVAL_MS_MIN} and {POLL_INTERVAL_MS_MAX} milliseconds"),
            ));
        }
        Ok(())
    }

    fn check_collection_name(
        &self,
        name: &Spanned<String>,
        field: String,
    ) -> Result<(), ConfigError> {
        if name.get_ref().is_empty() || name.get_ref().contains(['\0', '/']) {
            return Err(self.invalid(
                name.span(),
                field,
                "a collection name is non-empty and has no `/` or NUL".to_owned(),
            ));
        }
        Ok(())
    }

    /// The trusted peers' ids.
    pub fn peer_ids(&self) -> Vec<PeerId> {
        self.peers
            .iter()
            .filter_map(|p| p.id.get_ref().parse().ok())
            .collect()
    }

    /// An error about the value at `span`, naming its line.
    pub fn invalid(&self, span: Range<usize>, field: String, message: String) -> ConfigError {
        let line = self.source[..span.start.min(self.source.len())]
            .matches('\n')
            .count()
            + 1;
        ConfigError::Invalid {
            path: self.path.clone(),
            line,
            field,
            message,
        }
    }
}

/// The shortest polling interval a tool may set, in milliseconds.
pub const POLL_INTERVAL_MS_MIN: u64 = 10;
/// The longest, in milliseconds (an hour).
pub const POLL_INTERVAL_MS_MAX: u64 = 3_600_000;

/// Requests a `rest` tool may have in flight at most.
pub const CONCURRENCY_MAX: usize = 64;

/// Tool names are at most this long.
pub const TOOL_NAME_LEN_MAX: usize = 64;

/// What a configuration of the old shape is told.
const OLD_SQLITE_SHAPE: &str = "the `[sqlite]` table is replaced by `[[tool]]`: write \
`[[tool]]` with `name = \"sqlite\"`, `kind = \"sqlite\"` and the same `path`, and turn each \
`[[sqlite.collection]]` into `[[tool.collection]]` with the same keys plus \
`identity = \"shared_key\"` (how records were identified before; the new default for \
keys the database assigns is `tool_ids`, which a store synced before cannot take over)";

/// The commented configuration `concord init` writes.
pub fn template(listen: SocketAddr, peer_id: &PeerId) -> String {
    format!(
        r#"# Concord agent configuration. This agent's peer id: {peer_id}
# Give that id to the peers that should trust this agent.

# Where the agent keeps its store (documents, change logs, cursors).
data_dir = "data"
# This agent's key and certificate (keep it private).
key_file = "concord.key"
# The UDP address peers reach this agent at.
listen = "{listen}"

# Each trusted peer: its id (from its `concord init`) and, optionally, where to dial it.
# [[peer]]
# id = "..."
# addr = "127.0.0.1:7401"

# Each tool kept in sync: a unique name in this agent, its kind and where it is.
# Without any [[tool]] the agent is a hub: list the collections it relays as
# [[collection]] tables with a `name`.
[[tool]]
name = "app"
kind = "sqlite"
# The database file (it must exist; Concord never creates it).
path = "app.db"

# Each synced table. The collection name must match on every agent.
[[tool.collection]]
name = "customers"
table = "customers"
primary_key = "id"
# Columns synced as they are.
columns = ["name", "email"]
# Only the records this CEL expression passes (over canonical fields):
# filter = 'status == "active"'
#
# A column mapped onto a canonical field of another name and type (README: Mapping):
# [[tool.collection.field]]
# column = "amount_cents"
# field = "amount"
# convert = "minor_units"

# Records identified by their normalised e-mail in every tool, and how conflicts and
# deletes settle (the same on every agent; README: Conflicts):
# [[collection]]
# name = "customers"
# natural_key = ["email"]
# conflicts = "latest_edit"      # or "system_of_record" (with system_of_record = "erp"), "manual"
# deletes = "delete_wins"        # or "edit_wins"
# hold_deletes = ["crm"]         # deletes from these tools wait for `concord deletes approve`

# A PostgreSQL database is a tool too (the role must own the synced tables):
# [[tool]]
# name = "erp"
# kind = "postgres"
# url = "postgresql://concord:secret@127.0.0.1:5432/erp"
# # How often to look for changes when no notification came (default 1000).
# poll_interval_ms = 1000
#
# [[tool.collection]]
# name = "customers"
# table = "public.customers"
# primary_key = "id"
# columns = ["name", "email"]

# The admin API of `concord conflicts`, `deletes`, `dead-letters` and `history`:
# loopback by default; any other address needs a token.
# [admin]
# listen = "127.0.0.1:7390"
# token = "a long random secret"

[log]
# "text" or "json"
format = "text"
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
data_dir = "data"
key_file = "k.pem"
listen = "127.0.0.1:7400"

[[tool]]
name = "crm"
kind = "sqlite"
path = "a.db"

[[tool.collection]]
name = "customers"
table = "customers"
primary_key = "id"
columns = ["name"]
"#;

    #[test]
    fn a_good_file_loads_with_paths_made_relative_to_it() -> Result<(), ConfigError> {
        let config = Config::parse(Path::new("/etc/concord/agent.toml"), GOOD.to_owned())?;
        let path = config.tools[0].path.as_ref().map(|p| p.get_ref().clone());
        assert_eq!(path.as_deref(), Some(Path::new("/etc/concord/a.db")));
        assert_eq!(config.tools[0].name.get_ref(), "crm");
        Ok(())
    }

    #[test]
    fn an_unknown_key_names_file_line_and_key() {
        let bad = GOOD.replace(
            "table = \"customers\"",
            "table = \"customers\"\ncolums = [\"x\"]",
        );
        let err = Config::parse(Path::new("agent.toml"), bad)
            .expect_err("unknown key")
            .to_string();
        assert!(err.contains("agent.toml"), "{err}");
        assert!(err.contains("line 14"), "{err}");
        assert!(err.contains("colums"), "{err}");
    }

    #[test]
    fn a_bad_peer_id_names_its_line() {
        let bad = GOOD.replacen("[[tool]]", "[[peer]]\nid = \"nope\"\n\n[[tool]]", 1);
        let err = Config::parse(Path::new("agent.toml"), bad)
            .expect_err("bad id")
            .to_string();
        assert!(err.starts_with("agent.toml:7: `peer[0].id`"), "{err}");
    }

    #[test]
    fn the_old_sqlite_table_is_refused_with_what_to_write_instead() {
        let old = GOOD
            .replace(
                "[[tool]]\nname = \"crm\"\nkind = \"sqlite\"\n",
                "[sqlite]\n",
            )
            .replace("[[tool.collection]]", "[[sqlite.collection]]");
        let err = Config::parse(Path::new("agent.toml"), old)
            .expect_err("old shape")
            .to_string();
        assert!(err.contains("[[tool]]"), "{err}");
        assert!(err.contains("kind = \"sqlite\""), "{err}");
        assert!(err.contains("[[tool.collection]]"), "{err}");
        assert!(err.contains("identity = \"shared_key\""), "{err}");
    }

    #[test]
    fn tool_names_are_unique_in_an_agent() {
        let twice = format!("{GOOD}\n{}", &GOOD[GOOD.find("[[tool]]").unwrap_or(0)..]);
        let err = Config::parse(Path::new("agent.toml"), twice)
            .expect_err("two tools named crm")
            .to_string();
        assert!(err.contains("`tool[1].name`"), "{err}");
        assert!(err.contains("configured twice"), "{err}");
    }

    #[test]
    fn a_hub_lists_the_collections_it_relays() -> Result<(), ConfigError> {
        let hub = format!(
            "{}[[collection]]\nname = \"customers\"\n",
            &GOOD[..GOOD.find("[[tool]]").unwrap_or(0)]
        );
        let config = Config::parse(Path::new("hub.toml"), hub)?;
        assert!(config.tools.is_empty());
        assert_eq!(config.collections[0].name.get_ref(), "customers");
        let empty = GOOD[..GOOD.find("[[tool]]").unwrap_or(0)].to_owned();
        let err = Config::parse(Path::new("hub.toml"), empty)
            .expect_err("nothing to sync")
            .to_string();
        assert!(err.contains("nothing to sync"), "{err}");
        Ok(())
    }

    /// A `rest` tool with one collection, its API given.
    const REST: &str = r#"
data_dir = "data"
key_file = "k.pem"
listen = "127.0.0.1:7400"

[[tool]]
name = "crm"
kind = "rest"
url = "http://127.0.0.1:8090"
token_env = "CRM_TOKEN"

[tool.webhook]
secret = "s"

[[tool.collection]]
name = "customers"
resource = "customers"
columns = ["name"]

[tool.collection.api]
list = "/r?since={{ since }}"
get = "/r/{{ id }}"
create = "POST /r"
update = "PATCH /r/{{ id }}"
delete = "DELETE /r/{{ id }}"
"#;

    #[test]
    fn rest_and_csv_settings_are_checked_where_they_are_written() {
        assert!(Config::parse(Path::new("a.toml"), REST.to_owned()).is_ok());
        let cases = [
            (
                REST.replace(
                    "token_env = \"CRM_TOKEN\"",
                    "token = \"t\"\ntoken_env = \"X\"",
                ),
                "`tool[0].token_env`: give `token` or `token_env`, not both",
            ),
            (
                REST.replace("secret = \"s\"", "header = \"X-Sig\""),
                "`tool[0].webhook.secret`: webhooks are signed",
            ),
            (
                REST[..REST.find("[tool.collection.api]").unwrap_or(0)].to_owned(),
                "`tool[0].collection[0].api`: a `rest` collection needs `api`",
            ),
            (
                REST.replace("url = \"http://127.0.0.1:8090\"", "url = \"ftp://x\""),
                "`tool[0].url`: an API address starts with",
            ),
            (
                GOOD.replace("path = \"a.db\"", "path = \"a.db\"\ntoken = \"t\""),
                "`tool[0].token`: `token` is a setting of `rest` tools",
            ),
            (
                GOOD.replace("kind = \"sqlite\"", "kind = \"csv\"").replace(
                    "columns = [\"name\"]",
                    "columns = [\"name\"]\ndelimiter = \";;\"",
                ),
                "`tool[0].collection[0].delimiter`: one ASCII character",
            ),
            (
                GOOD.replace(
                    "columns = [\"name\"]",
                    "columns = [\"name\"]\ntypes = { name = \"text\" }",
                ),
                "`types` is a setting of `rest` and `csv` tools",
            ),
        ];
        for (text, expected) in cases {
            let err = Config::parse(Path::new("a.toml"), text)
                .expect_err(expected)
                .to_string();
            assert!(err.contains(expected), "{err}\nexpected: {expected}");
        }
    }

    #[test]
    fn the_template_parses() -> Result<(), ConfigError> {
        let id: PeerId = "a".repeat(52).parse().expect("a valid id");
        let text = template("127.0.0.1:7400".parse().expect("addr"), &id);
        Config::parse(Path::new("concord.toml"), text)?;
        Ok(())
    }
}
