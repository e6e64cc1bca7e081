//! The CLI's side of the admin API: `concord conflicts`, `deletes`, `dead-letters`
//! and `history` talk to a running agent through it.

use std::net::SocketAddr;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::json::{ConflictView, HeldView, HistoryView, LetterView};
use super::{ADMIN_ADDRESS_FILE, ConflictDetail, RecordHistory, Resolution};
use crate::config::Config;
use crate::core::RecordRef;
use crate::telemetry::{PeerView, StatusView};

/// Why the CLI could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The agent's admin API could not be reached.
    #[error(
        "cannot reach the agent's admin API at {url}: {reason} (is `concord run` running with this config?)"
    )]
    Unreachable {
        /// Where it was looked for.
        url: String,
        /// Why.
        reason: String,
    },
    /// The agent answered with an error.
    #[error("the agent answered {status}: {message}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The agent's message.
        message: String,
    },
    /// What was asked is malformed.
    #[error("{0}")]
    Usage(String),
}

/// A client of one agent's admin API.
#[derive(Debug, Clone)]
pub struct AdminClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl AdminClient {
    /// A client of the agent at `addr`, sending `token` if given.
    pub fn new(addr: SocketAddr, token: Option<String>) -> AdminClient {
        AdminClient {
            base: format!("http://{addr}"),
            token,
            http: reqwest::Client::new(),
        }
    }

    /// A client of the agent that runs `config`: the configured address or, for
    /// port 0, the one the agent recorded in its data folder.
    pub fn for_config(config: &Config) -> Result<AdminClient, ClientError> {
        let mut addr = *config.admin.listen.get_ref();
        if addr.port() == 0 {
            let file = config.data_dir.join(ADMIN_ADDRESS_FILE);
            let text = std::fs::read_to_string(&file).map_err(|e| ClientError::Unreachable {
                url: file.display().to_string(),
                reason: e.to_string(),
            })?;
            addr = text.trim().parse().map_err(|_| ClientError::Unreachable {
                url: file.display().to_string(),
                reason: format!("{text:?} is not an address"),
            })?;
        }
        if addr.ip().is_unspecified() {
            addr.set_ip(if addr.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            });
        }
        let token = config.admin.token.as_ref().map(|t| t.get_ref().clone());
        Ok(AdminClient::new(addr, token))
    }

    async fn send<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<T, ClientError> {
        let request = match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let response = request.send().await.map_err(|e| ClientError::Unreachable {
            url: url.to_owned(),
            reason: e.to_string(),
        })?;
        let status = response.status();
        let body: serde_json::Value = response.json().await.map_err(|e| ClientError::Api {
            status: status.as_u16(),
            message: format!("unreadable answer: {e}"),
        })?;
        if !status.is_success() {
            let message = body
                .get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("no message")
                .to_owned();
            return Err(ClientError::Api {
                status: status.as_u16(),
                message,
            });
        }
        serde_json::from_value(body).map_err(|e| ClientError::Api {
            status: status.as_u16(),
            message: format!("unexpected answer: {e}"),
        })
    }

    /// GETs `path` of the API.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        self.send(self.http.get(&url), &url).await
    }

    /// POSTs `body` as JSON to `path` of the API.
    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        self.send(self.http.post(&url).json(body), &url).await
    }

    /// The agent's status.
    pub async fn status(&self) -> Result<StatusView, ClientError> {
        self.get("/api/status").await
    }

    /// The agent's peers.
    pub async fn peers(&self) -> Result<Vec<PeerView>, ClientError> {
        self.get("/api/peers").await
    }

    /// The agent's metrics, in Prometheus' text format.
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let url = format!("{}/metrics", self.base);
        let request = self.http.get(&url);
        let request = match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let unreachable = |e: reqwest::Error| ClientError::Unreachable {
            url: url.clone(),
            reason: e.to_string(),
        };
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status().as_u16();
        let text = response.text().await.map_err(unreachable)?;
        if status != 200 {
            return Err(ClientError::Api {
                status,
                message: text,
            });
        }
        Ok(text)
    }

    /// The conflicts waiting for a person.
    pub async fn conflicts(&self) -> Result<Vec<ConflictView>, ClientError> {
        self.get("/api/conflicts").await
    }

    /// One conflict, with its field's history.
    pub async fn conflict(&self, id: &str) -> Result<ConflictDetail, ClientError> {
        let (doc, field) = split_conflict_id(id)?;
        self.get(&format!("/api/conflicts/{doc}/{}", encode(field)))
            .await
    }

    /// Settles conflict `id`.
    pub async fn resolve(&self, id: &str, resolution: &Resolution) -> Result<(), ClientError> {
        let (doc, field) = split_conflict_id(id)?;
        let _: serde_json::Value = self
            .post(
                &format!("/api/conflicts/{doc}/{}/resolve", encode(field)),
                resolution,
            )
            .await?;
        Ok(())
    }

    /// The deletes waiting for approval.
    pub async fn held_deletes(&self) -> Result<Vec<HeldView>, ClientError> {
        self.get("/api/deletes").await
    }

    /// Approves (`approve`) or rejects (`reject`) held delete `id`.
    pub async fn decide_delete(&self, action: &str, id: &str) -> Result<(), ClientError> {
        let _: serde_json::Value = self
            .post(&format!("/api/deletes/{action}"), &record_ref(id)?)
            .await?;
        Ok(())
    }

    /// The dead letters.
    pub async fn dead_letters(&self) -> Result<Vec<LetterView>, ClientError> {
        self.get("/api/dead-letters").await
    }

    /// Retries (`retry`) or discards (`discard`) dead letter `id`.
    pub async fn act_on_letter(&self, action: &str, id: &str) -> Result<(), ClientError> {
        let _: serde_json::Value = self
            .post(&format!("/api/dead-letters/{action}"), &record_ref(id)?)
            .await?;
        Ok(())
    }

    /// The history of record `key` of `collection` (its key in `tool`, if given).
    pub async fn history(
        &self,
        collection: &str,
        key: &str,
        tool: Option<&str>,
    ) -> Result<RecordHistory, ClientError> {
        let mut path = format!("/api/history/{}/{}", encode(collection), encode(key));
        if let Some(tool) = tool {
            path.push_str(&format!("?tool={}", encode(tool)));
        }
        self.get(&path).await
    }
}

/// `<record id>/<field>` split in two.
fn split_conflict_id(id: &str) -> Result<(&str, &str), ClientError> {
    id.split_once('/')
        .filter(|(doc, field)| doc.len() == 32 && !field.is_empty())
        .ok_or_else(|| {
            ClientError::Usage(format!(
                "{id:?} is not a conflict id (`<record id>/<field>`, as `concord conflicts list` prints)"
            ))
        })
}

/// `<tool>/<collection>/<key>` as a record of a tool.
fn record_ref(id: &str) -> Result<RecordRef, ClientError> {
    let mut parts = id.splitn(3, '/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(tool), Some(collection), Some(key))
            if !tool.is_empty() && !collection.is_empty() && !key.is_empty() =>
        {
            Ok(RecordRef {
                tool: tool.to_owned(),
                collection: collection.to_owned(),
                key: key.to_owned(),
            })
        }
        _ => Err(ClientError::Usage(format!(
            "{id:?} is not a record id (`<tool>/<collection>/<key>`, as the list prints)"
        ))),
    }
}

/// `text` made safe as one segment of a URL path.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A time span in seconds as people read it: `45 s`, `3 min 20 s`, `2 h 5 min`.
fn span(seconds: i64) -> String {
    match seconds.max(0) {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min {} s", s / 60, s % 60),
        s => format!("{} h {} min", s / 3600, s % 3600 / 60),
    }
}

/// How long ago `at_ms` was, from `now_ms`.
fn ago(at_ms: Option<i64>, now_ms: i64) -> String {
    match at_ms {
        Some(at) if now_ms - at < 1000 => "now".to_owned(),
        Some(at) => format!("{} ago", span((now_ms - at) / 1000)),
        None => "never".to_owned(),
    }
}

fn or_unknown<T: std::fmt::Display>(value: Option<T>) -> String {
    value.map_or_else(|| "?".to_owned(), |v| v.to_string())
}

/// Prints `rows` as columns under `header`, each as wide as its widest cell.
fn print_table(indent: &str, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{indent}{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        line(row.clone());
    }
}

/// The lines `concord status` prints: the agent, its tools, collections and peers
/// (with their lag), and what waits for a person.
pub fn print_status(status: &StatusView) {
    let a = &status.agent;
    println!(
        "agent {}  {}  listening on {}, up {}, version {}",
        a.peer_id,
        if a.ready { "ready" } else { "NOT READY" },
        a.listen,
        span((a.now_ms - a.started_ms) / 1000),
        a.version
    );
    println!("tools:");
    let rows: Vec<Vec<String>> = status
        .tools
        .iter()
        .map(|t| {
            vec![
                t.name.clone(),
                t.kind.clone(),
                if t.reachable { "up" } else { "DOWN" }.to_owned(),
                t.captured.to_string(),
                t.written.to_string(),
                t.pending.to_string(),
                t.errors.to_string(),
                t.last_error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print_table(
        "  ",
        &[
            "TOOL",
            "KIND",
            "STATE",
            "CAPTURED",
            "WRITTEN",
            "PENDING",
            "ERRORS",
            "LAST ERROR",
        ],
        &rows,
    );
    println!("collections:");
    let rows: Vec<Vec<String>> = status
        .collections
        .iter()
        .map(|c| {
            vec![
                c.name.clone(),
                c.records.to_string(),
                c.log_head.to_string(),
            ]
        })
        .collect();
    print_table("  ", &["COLLECTION", "RECORDS", "LOG HEAD"], &rows);
    println!("peers:");
    let rows: Vec<Vec<String>> = status
        .peers
        .iter()
        .map(|p| {
            vec![
                p.id.chars().take(12).collect(),
                if p.connected {
                    "connected"
                } else {
                    "disconnected"
                }
                .to_owned(),
                or_unknown(p.changes_behind),
                or_unknown(p.seconds_behind.map(|s| format!("{s:.1} s"))),
                or_unknown(p.incoming_behind),
                ago(p.last_seen_ms, a.now_ms),
            ]
        })
        .collect();
    print_table(
        "  ",
        &["PEER", "STATE", "BEHIND", "LAG", "INCOMING", "LAST SEEN"],
        &rows,
    );
    let q = &status.queues;
    println!(
        "waiting for a person: {} conflicts, {} held deletes, {} dead letters",
        q.conflicts, q.held_deletes, q.dead_letters
    );
}

/// The lines `concord peers` prints.
pub fn print_peers(peers: &[PeerView], now_ms: i64) {
    if peers.is_empty() {
        println!("no peers configured or seen");
        return;
    }
    let rows: Vec<Vec<String>> = peers
        .iter()
        .map(|p| {
            vec![
                p.id.clone(),
                p.addr.clone().unwrap_or_else(|| "-".to_owned()),
                if p.connected {
                    "connected"
                } else {
                    "disconnected"
                }
                .to_owned(),
                p.since_ms
                    .filter(|_| p.connected)
                    .map_or_else(|| "-".to_owned(), |since| span((now_ms - since) / 1000)),
                ago(p.last_seen_ms, now_ms),
                or_unknown(p.changes_behind),
                p.sent.to_string(),
                p.received.to_string(),
                format!("{}/{}", bytes(p.bytes_in), bytes(p.bytes_out)),
            ]
        })
        .collect();
    print_table(
        "",
        &[
            "PEER",
            "ADDRESS",
            "STATE",
            "UP FOR",
            "LAST SEEN",
            "BEHIND",
            "SENT",
            "RECEIVED",
            "BYTES IN/OUT",
        ],
        &rows,
    );
}

/// A byte count as people read it.
fn bytes(n: u64) -> String {
    match n {
        n if n < 1 << 10 => format!("{n} B"),
        n if n < 1 << 20 => format!("{:.1} KiB", n as f64 / 1024.0),
        n if n < 1 << 30 => format!("{:.1} MiB", n as f64 / (1 << 20) as f64),
        n => format!("{:.1} GiB", n as f64 / (1 << 30) as f64),
    }
}

/// The lines `concord conflicts list` prints.
pub fn print_conflicts(conflicts: &[ConflictView]) {
    if conflicts.is_empty() {
        println!("no conflicts wait for a decision");
        return;
    }
    for c in conflicts {
        println!("{}  {}.{}", c.id, c.collection, c.field);
        print_values(c);
    }
}

fn print_values(c: &ConflictView) {
    for (i, v) in c.values.iter().enumerate() {
        let holding = if i == c.interim {
            "  (in the tools meanwhile)"
        } else {
            ""
        };
        println!(
            "  [{i}] {:<24} from {} at {}{holding}",
            v.value.display,
            source(&v.agent, &v.tool),
            v.time
        );
    }
}

/// The lines `concord conflicts show` prints.
pub fn print_conflict(detail: &ConflictDetail) {
    let c = &detail.conflict;
    println!("conflict {}", c.id);
    println!("collection {}, field {}", c.collection, c.field);
    println!("values:");
    print_values(c);
    println!("history of the field:");
    print_history_lines(&detail.history, "  ");
    println!(
        "settle it with: concord conflicts resolve {} --pick N (or --value V)",
        c.id
    );
}

/// The lines `concord deletes list` prints.
pub fn print_held(held: &[HeldView]) {
    if held.is_empty() {
        println!("no deletes wait for approval");
    }
    for h in held {
        println!("{}  deleted at {} (record {})", h.id, h.time, h.doc);
    }
}

/// The lines `concord dead-letters list` prints.
pub fn print_letters(letters: &[LetterView]) {
    if letters.is_empty() {
        println!("no dead letters");
    }
    for l in letters {
        let retry = match &l.retry_at {
            Some(at) => format!("retried at {at}"),
            None => "waits for a person".to_owned(),
        };
        println!("{}  [{}] {}", l.id, l.kind, l.reason);
        println!("  since {}, {} attempt(s), {retry}", l.since, l.attempts);
    }
}

/// The lines `concord history` prints: per field, every value it had.
pub fn print_history(history: &RecordHistory) {
    println!(
        "record {} of {}{}",
        history.doc,
        history.collection,
        if history.deleted { " (deleted)" } else { "" }
    );
    for (tool, key) in &history.keys {
        println!("  key {key} in {tool}");
    }
    let mut fields: Vec<&str> = history.entries.iter().map(|e| e.field.as_str()).collect();
    fields.sort_unstable();
    fields.dedup();
    for field in fields {
        println!("{field}");
        let entries: Vec<HistoryView> = history
            .entries
            .iter()
            .filter(|e| e.field == field)
            .cloned()
            .collect();
        print_history_lines(&entries, "  ");
    }
}

fn print_history_lines(entries: &[HistoryView], indent: &str) {
    for e in entries {
        let value = e
            .value
            .as_ref()
            .map_or_else(|| "(removed)".to_owned(), |v| v.display.clone());
        let mut line = format!(
            "{indent}{}  {:<24} from {}",
            e.time,
            value,
            source(&e.agent, &e.tool)
        );
        match (&e.decided_by_policy, &e.decided_on) {
            (Some(policy), Some(on)) => line.push_str(&format!(", chosen by {policy} on {on}")),
            (Some(policy), None) => line.push_str(&format!(", chosen by {policy}")),
            _ => {}
        }
        if e.current {
            line.push_str("  <- current");
        }
        println!("{line}");
    }
}

fn source(agent: &str, tool: &str) -> String {
    match (agent.is_empty(), tool.is_empty()) {
        (true, _) => "an unknown source".to_owned(),
        (false, true) => format!("a person on {agent}"),
        (false, false) => format!("{tool} on {agent}"),
    }
}
