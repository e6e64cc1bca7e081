//! What the admin API answers, as JSON: values in their natural JSON form with their
//! type, times as RFC 3339 text beside milliseconds.

use crdt_model::{Contested, Decimal, HistoryEntry, Timestamp, Value};
use serde::{Deserialize, Serialize};

use crate::store::{DeadLetter, HeldDelete, OpenConflict};

/// A value as JSON, with its type and how the CLI prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValueView {
    /// The value's type (`text`, `int`, `decimal`, ...).
    #[serde(rename = "type")]
    pub kind: String,
    /// The value in JSON (decimals and timestamps as text).
    pub value: serde_json::Value,
    /// The value as the CLI prints it.
    pub display: String,
}

impl ValueView {
    /// The view of `value`.
    pub fn of(value: &Value) -> ValueView {
        ValueView {
            kind: value.type_name().to_owned(),
            value: to_json(value),
            display: display(value),
        }
    }
}

/// A conflict waiting for a person.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConflictView {
    /// The conflict's id: `<record id>/<field>`.
    pub id: String,
    /// The collection.
    pub collection: String,
    /// The record's id (its document).
    pub doc: String,
    /// The field.
    pub field: String,
    /// The concurrent values, numbered from 0.
    pub values: Vec<SourcedValue>,
    /// The value the tools hold meanwhile.
    pub interim: usize,
}

/// A value with where it came from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourcedValue {
    /// The value.
    pub value: ValueView,
    /// The agent whose tool gave it.
    pub agent: String,
    /// The tool that gave it (empty: a person).
    pub tool: String,
    /// When it was edited (ms since the epoch).
    pub time_ms: i64,
    /// The same, in RFC 3339.
    pub time: String,
}

impl ConflictView {
    /// The view of `conflict`.
    pub fn of(conflict: &OpenConflict) -> ConflictView {
        let doc = crdt_model::DocId(conflict.doc).to_string();
        ConflictView {
            id: format!("{doc}/{}", conflict.field),
            collection: conflict.collection.clone(),
            doc,
            field: conflict.field.clone(),
            values: conflict
                .candidates
                .iter()
                .map(|c| SourcedValue {
                    value: ValueView::of(&c.value),
                    agent: c.agent.clone(),
                    tool: c.tool.clone(),
                    time_ms: c.time_ms,
                    time: rfc3339_ms(c.time_ms),
                })
                .collect(),
            interim: conflict.interim,
        }
    }
}

/// One value a field had.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryView {
    /// The field (`(deleted)` for the tombstone).
    pub field: String,
    /// The value; `None` when the field was removed.
    pub value: Option<ValueView>,
    /// When (ms since the epoch).
    pub time_ms: i64,
    /// The same, in RFC 3339.
    pub time: String,
    /// The agent whose tool gave the value, or that a person used.
    pub agent: String,
    /// The tool that gave it (empty: a person, or unknown).
    pub tool: String,
    /// The policy that chose this value among concurrent ones, if one did.
    pub decided_by_policy: Option<String>,
    /// The agent that wrote that decision.
    pub decided_on: Option<String>,
    /// Whether the record holds this value now.
    pub current: bool,
}

impl HistoryView {
    /// The view of `entry`.
    pub fn of(entry: &HistoryEntry) -> HistoryView {
        let decision = entry.provenance.decision.as_ref();
        HistoryView {
            field: match &entry.key {
                Contested::Field(field) => field.clone(),
                Contested::Tombstone => "(deleted)".to_owned(),
            },
            value: entry.value.as_ref().map(ValueView::of),
            time_ms: entry.time_ms,
            time: rfc3339_ms(entry.time_ms),
            agent: entry.provenance.agent.clone(),
            tool: entry.provenance.tool.clone(),
            decided_by_policy: decision.map(|d| d.policy.clone()),
            decided_on: decision.filter(|d| !d.by.is_empty()).map(|d| d.by.clone()),
            current: entry.current,
        }
    }
}

/// A delete waiting for approval.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeldView {
    /// Its id: `<tool>/<collection>/<key>`.
    pub id: String,
    /// The tool it was deleted from.
    pub tool: String,
    /// The collection.
    pub collection: String,
    /// The record's key in the tool.
    pub key: String,
    /// The record's id (its document).
    pub doc: String,
    /// When the delete was captured.
    pub time: String,
}

impl HeldView {
    /// The view of `held`.
    pub fn of(held: &HeldDelete) -> HeldView {
        HeldView {
            id: format!("{}/{}/{}", held.tool, held.collection, held.key),
            tool: held.tool.clone(),
            collection: held.collection.clone(),
            key: held.key.clone(),
            doc: crdt_model::DocId(held.doc).to_string(),
            time: rfc3339_ms(held.time_ms),
        }
    }
}

/// A dead letter.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LetterView {
    /// Its id: `<tool>/<collection>/<key>`.
    pub id: String,
    /// The tool.
    pub tool: String,
    /// The collection.
    pub collection: String,
    /// The record's key in the tool (its id, for a record not inserted yet).
    pub key: String,
    /// The kind of reason (`invalid_row`, `rejected`, `mapping`, `no_key`).
    pub kind: String,
    /// The reason, in words.
    pub reason: String,
    /// Write-backs refused so far.
    pub attempts: u32,
    /// When it is retried next, if it is.
    pub retry_at: Option<String>,
    /// Since when it waits.
    pub since: String,
}

impl LetterView {
    /// The view of `letter`.
    pub fn of(letter: &DeadLetter) -> LetterView {
        use crate::store::LetterReason as R;
        let kind = match &letter.reason {
            R::InvalidRow(_) => "invalid_row",
            R::Rejected(_) => "rejected",
            R::Mapping(_) => "mapping",
            R::NoKey => "no_key",
        };
        LetterView {
            id: format!("{}/{}/{}", letter.tool, letter.collection, letter.key),
            tool: letter.tool.clone(),
            collection: letter.collection.clone(),
            key: letter.key.clone(),
            kind: kind.to_owned(),
            reason: letter.reason.to_string(),
            attempts: letter.attempts,
            retry_at: letter.retry_at_ms.map(rfc3339_ms),
            since: rfc3339_ms(letter.since_ms),
        }
    }
}

/// `ms` since the epoch in RFC 3339, UTC, to the millisecond.
pub(crate) fn rfc3339_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_else(|| format!("{ms} ms"))
}

fn display(value: &Value) -> String {
    match value {
        Value::Timestamp(t) => rfc3339_micros(*t),
        other => other.to_string(),
    }
}

fn rfc3339_micros(t: Timestamp) -> String {
    chrono::DateTime::from_timestamp_micros(t.micros())
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
        .unwrap_or_else(|| format!("@{}us", t.micros()))
}

fn to_json(value: &Value) -> serde_json::Value {
    use serde_json::Value as J;
    match value {
        Value::Null => J::Null,
        Value::Bool(b) => J::Bool(*b),
        Value::Int(i) => J::from(*i),
        Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        Value::Decimal(d) => J::String(d.as_str().to_owned()),
        Value::Text(s) => J::String(s.clone()),
        Value::Timestamp(t) => J::String(rfc3339_micros(*t)),
        Value::List(items) => J::Array(items.iter().map(to_json).collect()),
        Value::Map(map) => J::Object(map.iter().map(|(k, v)| (k.clone(), to_json(v))).collect()),
    }
}

/// A value a person typed, read as the type of `like` (the conflicting values').
pub(crate) fn from_json(json: &serde_json::Value, like: &Value) -> Result<Value, String> {
    use serde_json::Value as J;
    let text = match json {
        J::String(s) => s.clone(),
        J::Null => return Ok(Value::Null),
        other => other.to_string(),
    };
    let wrong = |e: &dyn std::fmt::Display| format!("{text:?} is not a {}: {e}", like.type_name());
    Ok(match like {
        Value::Bool(_) => Value::Bool(text.parse().map_err(|e| wrong(&e))?),
        Value::Int(_) => Value::Int(text.trim().parse().map_err(|e| wrong(&e))?),
        Value::Float(_) => Value::Float(text.trim().parse().map_err(|e| wrong(&e))?),
        Value::Decimal(_) => Value::Decimal(Decimal::parse(text.trim()).map_err(|e| wrong(&e))?),
        Value::Timestamp(_) => {
            let t = chrono::DateTime::parse_from_rfc3339(text.trim()).map_err(|e| wrong(&e))?;
            Value::Timestamp(Timestamp::from_micros(t.timestamp_micros()))
        }
        Value::Null | Value::Text(_) => Value::Text(text),
        Value::List(_) | Value::Map(_) => {
            return Err(format!(
                "a {} cannot be typed in: pick one of the listed values",
                like.type_name()
            ));
        }
    })
}
