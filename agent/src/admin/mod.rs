//! The admin HTTP API: the queues a person decides (conflicts, held deletes, dead
//! letters) and the history of a record, for the `concord` CLI (and the dashboard).
//!
//! Reads go to the committed store ([`StoreReader`]); actions go through the core's
//! queue like every other change, and are answered once committed. Served on
//! loopback by default; on any other address the config must set a bearer token,
//! and once set, every request must carry it.

mod client;
mod json;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use crdt_model::{Contested, DocId, HistoryEntry};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::core::{AdminAction, CoreHandle, CoreRequest, RecordRef};
use crate::engine::ActionError;
use crate::store::{StoreError, StoreReader};
use crate::telemetry::{Activity, PeerView, Series, StatusView, Telemetry};

/// The dashboard: one page with no outside assets, reading the API below.
const DASHBOARD: &str = include_str!("dashboard.html");

pub use client::{
    AdminClient, ClientError, print_conflict, print_conflicts, print_held, print_history,
    print_letters, print_peers, print_status,
};
pub use json::{ConflictView, HeldView, HistoryView, LetterView, ValueView};

/// The file in the data folder that holds the address the admin API listens on.
pub const ADMIN_ADDRESS_FILE: &str = "admin-address";

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// Committed reads.
    pub reader: StoreReader,
    /// Actions.
    pub core: CoreHandle,
    /// The bearer token every request must carry, if set.
    pub token: Option<Arc<str>>,
    /// This agent's tools, for finding a record by its key in one of them.
    pub tools: Arc<[String]>,
    /// Status, metrics and activity.
    pub telemetry: Arc<Telemetry>,
    /// The webhook endpoints of this agent's `rest` tools, by tool name.
    pub webhooks: Arc<crate::apps::WebhookEndpoints>,
}

/// An error answered as JSON `{"error": ...}` with its status.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

impl From<ActionError> for ApiError {
    fn from(e: ActionError) -> ApiError {
        match e {
            ActionError::NotFound(m) => ApiError(StatusCode::NOT_FOUND, m),
            ActionError::Refused(m) => ApiError(StatusCode::CONFLICT, m),
        }
    }
}

fn not_found(message: String) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, message)
}

fn bad_request(message: String) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message)
}

/// The API's routes over `state`. The dashboard page (which holds no data), the
/// health check and the webhook endpoints (which check their own signatures)
/// answer anyone; everything else needs the token, if one is set.
pub fn router(state: AdminState) -> Router {
    let open = Router::new()
        .route("/", get(dashboard))
        .route("/healthz", get(healthz))
        .route(
            "/hooks/{tool}",
            post(webhook).layer(axum::extract::DefaultBodyLimit::max(
                connectors::rest::webhook::BODY_MAX,
            )),
        );
    Router::new()
        .route("/metrics", get(metrics))
        .route("/api/status", get(status))
        .route("/api/peers", get(peers))
        .route("/api/activity", get(activity))
        .route("/api/series", get(series))
        .route("/api/conflicts", get(list_conflicts))
        .route("/api/conflicts/{doc}/{field}", get(show_conflict))
        .route(
            "/api/conflicts/{doc}/{field}/resolve",
            post(resolve_conflict),
        )
        .route("/api/deletes", get(list_deletes))
        .route("/api/deletes/{action}", post(decide_delete))
        .route("/api/dead-letters", get(list_letters))
        .route("/api/dead-letters/{action}", post(act_on_letter))
        .route("/api/history/{collection}/{key}", get(history))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorize,
        ))
        .merge(open)
        .with_state(state)
}

/// A web app's call that records of tool `tool` changed: checked against the
/// tool's shared secret, noted, and answered at once (the records are fetched
/// after). 204 when taken; 401 for a missing or wrong signature; 400 for a body
/// without a record id; 404 for a tool without webhooks.
async fn webhook(
    State(state): State<AdminState>,
    Path(tool): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Some(hooks) = state.webhooks.get(&tool) else {
        return not_found(format!("no tool `{tool}` of this agent takes webhooks")).into_response();
    };
    let signature = headers.get(hooks.header()).and_then(|v| v.to_str().ok());
    match hooks.receive(signature, &body) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => {
            tracing::warn!(tool = %tool, error = %e, "webhook refused");
            let status = match e {
                connectors::rest::WebhookError::Malformed(_) => StatusCode::BAD_REQUEST,
                _ => StatusCode::UNAUTHORIZED,
            };
            ApiError(status, e.to_string()).into_response()
        }
    }
}

async fn dashboard() -> axum::response::Html<&'static str> {
    axum::response::Html(DASHBOARD)
}

/// 200 once the store is open and every tool answered its last step; 503 with the
/// reasons otherwise.
async fn healthz(State(state): State<AdminState>) -> Response {
    match state.telemetry.readiness() {
        Ok(()) => Json(serde_json::json!({ "ready": true })).into_response(),
        Err(reasons) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "ready": false, "reasons": reasons })),
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let text = state.telemetry.render_metrics();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn status(State(state): State<AdminState>) -> Json<StatusView> {
    Json(state.telemetry.status())
}

async fn peers(State(state): State<AdminState>) -> Json<Vec<PeerView>> {
    Json(state.telemetry.status().peers)
}

async fn activity(State(state): State<AdminState>) -> Json<Vec<Activity>> {
    Json(state.telemetry.activity())
}

async fn series(State(state): State<AdminState>) -> Json<Series> {
    Json(state.telemetry.series())
}

/// Serves the API on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let app = router(state);
    let stop = async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::error!(error = %e, "the admin API stopped");
    }
}

/// Binds the admin API's listener at `addr` and records the address it got in the
/// data folder, for the CLI.
pub async fn bind(
    addr: SocketAddr,
    data_dir: &std::path::Path,
) -> std::io::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let tmp = data_dir.join(format!("{ADMIN_ADDRESS_FILE}.tmp"));
    std::fs::write(&tmp, bound.to_string())?;
    std::fs::rename(&tmp, data_dir.join(ADMIN_ADDRESS_FILE))?;
    Ok(listener)
}

/// Refuses a request without the configured bearer token.
async fn authorize(
    State(state): State<AdminState>,
    headers: HeaderMap,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(token) = &state.token {
        let given = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        let equal = given.len() == token.len()
            && given
                .bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if !equal {
            return ApiError(
                StatusCode::UNAUTHORIZED,
                "this agent's admin API needs its bearer token (`admin.token` in its config)"
                    .to_owned(),
            )
            .into_response();
        }
    }
    next.run(request).await
}

async fn act(state: &AdminState, action: AdminAction) -> Result<Json<serde_json::Value>, ApiError> {
    let (reply, answer) = oneshot::channel();
    let stopped = || {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is stopping".to_owned(),
        )
    };
    let done = match &action {
        AdminAction::Resolve { doc, field, .. } => {
            ("conflict", format!("conflict on {doc}/{field} resolved"))
        }
        AdminAction::ApproveDelete(r) => ("delete", format!("delete of {r} approved")),
        AdminAction::RejectDelete(r) => ("delete", format!("delete of {r} rejected")),
        AdminAction::RetryLetter(r) => ("letter", format!("dead letter {r} retried")),
        AdminAction::DiscardLetter(r) => ("letter", format!("dead letter {r} discarded")),
    };
    state
        .core
        .send(CoreRequest::Admin { action, reply })
        .await
        .map_err(|_| stopped())?;
    answer.await.map_err(|_| stopped())??;
    tracing::info!("{}", done.1);
    state.telemetry.note(done.0, done.1);
    Ok(Json(serde_json::json!({ "ok": true })))
}

async fn list_conflicts(
    State(state): State<AdminState>,
) -> Result<Json<Vec<ConflictView>>, ApiError> {
    let conflicts = state.reader.conflicts()?;
    Ok(Json(conflicts.iter().map(ConflictView::of).collect()))
}

fn parse_doc(doc: &str) -> Result<DocId, ApiError> {
    let bytes = data_encoding::HEXLOWER_PERMISSIVE
        .decode(doc.as_bytes())
        .ok()
        .and_then(|b| <[u8; 16]>::try_from(b).ok())
        .ok_or_else(|| bad_request(format!("{doc:?} is not a record id (32 hex digits)")))?;
    Ok(DocId(bytes))
}

/// One conflict with the whole history of its field.
#[derive(Debug, Serialize, Deserialize)]
pub struct ConflictDetail {
    /// The conflict.
    pub conflict: ConflictView,
    /// Every value the field had.
    pub history: Vec<HistoryView>,
}

async fn show_conflict(
    State(state): State<AdminState>,
    Path((doc, field)): Path<(String, String)>,
) -> Result<Json<ConflictDetail>, ApiError> {
    let id = parse_doc(&doc)?;
    let conflict = state.reader.conflict(id, &field)?.ok_or_else(|| {
        not_found(format!(
            "no open conflict of field {field:?} in record {doc}"
        ))
    })?;
    let history = field_history(&state.reader, id)?
        .into_iter()
        .filter(|h| h.key == Contested::Field(field.clone()))
        .map(|h| HistoryView::of(&h))
        .collect();
    Ok(Json(ConflictDetail {
        conflict: ConflictView::of(&conflict),
        history,
    }))
}

fn field_history(reader: &StoreReader, id: DocId) -> Result<Vec<HistoryEntry>, ApiError> {
    let mut doc = reader
        .load_doc(id)?
        .ok_or_else(|| not_found(format!("no record {id}")))?;
    doc.history().map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("record {id}: {e}"),
        )
    })
}

/// How a person settles a conflict: one of the values, or a new one.
#[derive(Debug, Serialize, Deserialize)]
pub struct Resolution {
    /// The number of the value chosen, as listed (from 0).
    #[serde(default)]
    pub pick: Option<usize>,
    /// A new value, read as the type of the conflicting values.
    #[serde(default)]
    pub value: Option<serde_json::Value>,
}

async fn resolve_conflict(
    State(state): State<AdminState>,
    Path((doc, field)): Path<(String, String)>,
    Json(resolution): Json<Resolution>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = parse_doc(&doc)?;
    let conflict = state.reader.conflict(id, &field)?.ok_or_else(|| {
        not_found(format!(
            "no open conflict of field {field:?} in record {doc}"
        ))
    })?;
    let value = match (resolution.pick, resolution.value) {
        (Some(pick), None) => conflict
            .candidates
            .get(pick)
            .map(|c| c.value.clone())
            .ok_or_else(|| {
                bad_request(format!(
                    "value {pick} is not one of the {} listed",
                    conflict.candidates.len()
                ))
            })?,
        (None, Some(value)) => {
            let like =
                &conflict.candidates[conflict.interim.min(conflict.candidates.len() - 1)].value;
            json::from_json(&value, like).map_err(bad_request)?
        }
        _ => return Err(bad_request("give either `pick` or `value`".to_owned())),
    };
    act(
        &state,
        AdminAction::Resolve {
            doc: id,
            field,
            value,
        },
    )
    .await
}

async fn list_deletes(State(state): State<AdminState>) -> Result<Json<Vec<HeldView>>, ApiError> {
    Ok(Json(
        state
            .reader
            .held_deletes()?
            .iter()
            .map(HeldView::of)
            .collect(),
    ))
}

async fn decide_delete(
    State(state): State<AdminState>,
    Path(action): Path<String>,
    Json(record): Json<RecordRef>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let action = match action.as_str() {
        "approve" => AdminAction::ApproveDelete(record),
        "reject" => AdminAction::RejectDelete(record),
        other => {
            return Err(not_found(format!(
                "no action {other:?} on deletes (approve, reject)"
            )));
        }
    };
    act(&state, action).await
}

async fn list_letters(State(state): State<AdminState>) -> Result<Json<Vec<LetterView>>, ApiError> {
    Ok(Json(
        state
            .reader
            .dead_letters()?
            .iter()
            .map(LetterView::of)
            .collect(),
    ))
}

async fn act_on_letter(
    State(state): State<AdminState>,
    Path(action): Path<String>,
    Json(record): Json<RecordRef>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let action = match action.as_str() {
        "retry" => AdminAction::RetryLetter(record),
        "discard" => AdminAction::DiscardLetter(record),
        other => {
            return Err(not_found(format!(
                "no action {other:?} on dead letters (retry, discard)"
            )));
        }
    };
    act(&state, action).await
}

/// Which record `history` is about.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct HistoryQuery {
    /// Look the key up in this tool only.
    #[serde(default)]
    pub tool: Option<String>,
}

/// The history of one record.
#[derive(Debug, Serialize, Deserialize)]
pub struct RecordHistory {
    /// The collection.
    pub collection: String,
    /// The record's id (its document).
    pub doc: String,
    /// The record's key in each tool it reached (by tool id in documents).
    pub keys: std::collections::BTreeMap<String, String>,
    /// Whether the record is deleted.
    pub deleted: bool,
    /// Every value each field had, oldest first.
    pub entries: Vec<HistoryView>,
}

async fn history(
    State(state): State<AdminState>,
    Path((collection, key)): Path<(String, String)>,
    Query(query): Query<HistoryQuery>,
) -> Result<Json<RecordHistory>, ApiError> {
    let id = find_record(&state, &collection, &key, query.tool.as_deref())?;
    let doc = state
        .reader
        .load_doc(id)?
        .ok_or_else(|| not_found(format!("no record {key:?} in {collection:?}")))?;
    let record = doc.read().map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("record {id}: {e}"),
        )
    })?;
    let entries = field_history(&state.reader, id)?;
    Ok(Json(RecordHistory {
        collection,
        doc: id.to_string(),
        keys: record.external_ids,
        deleted: record.deleted,
        entries: entries.iter().map(HistoryView::of).collect(),
    }))
}

/// The document of record `key` of `collection`: named by its id, its shared key,
/// or its key in one of this agent's tools (`tool`, if given).
fn find_record(
    state: &AdminState,
    collection: &str,
    key: &str,
    tool: Option<&str>,
) -> Result<DocId, ApiError> {
    let in_collection = |id: DocId| -> Result<bool, ApiError> {
        Ok(state
            .reader
            .load_doc(id)?
            .and_then(|d| d.identity().ok().flatten())
            .is_some_and(|(c, _)| c == collection))
    };
    let mut found = Vec::new();
    let tools: Vec<&str> = match tool {
        Some(tool) => {
            if !state.tools.iter().any(|t| t == tool) {
                return Err(not_found(format!("this agent has no tool {tool:?}")));
            }
            vec![tool]
        }
        None => {
            if let Ok(id) = parse_doc(key)
                && in_collection(id)?
            {
                return Ok(id);
            }
            for id in [DocId::of(collection, key), DocId::natural(collection, key)] {
                if in_collection(id)? {
                    found.push((String::from("(shared key)"), id));
                }
            }
            state.tools.iter().map(String::as_str).collect()
        }
    };
    for tool in &tools {
        if let Some(id) = state.reader.linked_doc(tool, collection, key)? {
            found.push(((*tool).to_owned(), id));
        }
    }
    // A shared key names the same record in every tool, with no link.
    if let [tool] = tools.as_slice()
        && found.is_empty()
        && in_collection(DocId::of(collection, key))?
    {
        found.push(((*tool).to_owned(), DocId::of(collection, key)));
    }
    found.dedup_by_key(|(_, id)| *id);
    match found.as_slice() {
        [] => Err(not_found(format!(
            "no record with key {key:?} in collection {collection:?} on this agent"
        ))),
        [(_, id)] => Ok(*id),
        many => Err(ApiError(
            StatusCode::CONFLICT,
            format!(
                "key {key:?} names different records in {}: say which tool with `--tool`",
                many.iter()
                    .map(|(t, _)| t.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}
