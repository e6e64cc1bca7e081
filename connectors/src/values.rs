//! Value helpers every connector shares: JSON documents as field values, values
//! quoted in messages, keys as text, and SQL quoting.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, NaiveDateTime, SecondsFormat, Utc};
use crdt_model::{Decimal, Timestamp, Value};

use crate::FieldType;

/// Longest text, in characters, that a message quotes before cutting it short.
pub(crate) const QUOTED_CHARS_MAX: usize = 64;

/// Largest magnitude of an integer that a 64-bit float holds exactly (2^53).
pub(crate) const FLOAT_EXACT_INT_MAX: u64 = 1 << 53;

/// Converts a parsed JSON document into a field value.
pub(crate) fn from_json(json: serde_json::Value) -> Value {
    match json {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => Value::Text(s),
        serde_json::Value::Array(items) => Value::List(items.into_iter().map(from_json).collect()),
        serde_json::Value::Object(map) => Value::Map(
            map.into_iter()
                .map(|(name, item)| (name, from_json(item)))
                .collect::<BTreeMap<_, _>>(),
        ),
    }
}

/// Converts a field value into a JSON document. JSON has no decimal, timestamp or
/// non-finite number, so those are refused rather than changed into something that
/// would read back as a different value.
pub(crate) fn to_json(value: &Value) -> Result<serde_json::Value, String> {
    Ok(match value {
        Value::Null => serde_json::Value::Null,
        Value::Bool(b) => serde_json::Value::Bool(*b),
        Value::Int(i) => serde_json::Value::from(*i),
        Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(serde_json::Value::Number)
            .ok_or_else(|| format!("cannot hold the float {f} in JSON"))?,
        Value::Text(s) => serde_json::Value::String(s.clone()),
        Value::List(items) => {
            serde_json::Value::Array(items.iter().map(to_json).collect::<Result<_, _>>()?)
        }
        Value::Map(map) => serde_json::Value::Object(
            map.iter()
                .map(|(name, item)| Ok((name.clone(), to_json(item)?)))
                .collect::<Result<_, String>>()?,
        ),
        Value::Decimal(_) | Value::Timestamp(_) => {
            return Err(format!(
                "is JSON, which has no {} type (found {})",
                value.type_name(),
                shorten(&value.to_string())
            ));
        }
    })
}

/// Cuts `text` to [`QUOTED_CHARS_MAX`] characters, marking the cut with `…`.
pub(crate) fn shorten(text: &str) -> String {
    match text.char_indices().nth(QUOTED_CHARS_MAX) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// The key text a field value stands for, if it can be a key (an integer, a text,
/// a decimal).
pub(crate) fn key_text(value: &Value) -> Option<String> {
    match value {
        Value::Int(i) => Some(i.to_string()),
        Value::Text(text) => Some(text.clone()),
        Value::Decimal(decimal) => Some(decimal.as_str().to_owned()),
        _ => None,
    }
}

/// Quotes an SQL identifier: `a"b` becomes `"a""b"`.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes an SQL string literal: `it's` becomes `'it''s'`.
pub(crate) fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Parses the timestamp formats found in SQLite databases, all but RFC 3339 read as UTC:
/// RFC 3339 (`2024-05-01T10:00:00Z`, `2024-05-01 12:00:00.5+02:00`),
/// `YYYY-MM-DD HH:MM:SS[.ffffff]`, `YYYY-MM-DDTHH:MM:SS[.ffffff]`, `YYYY-MM-DD HH:MM`
/// and `YYYY-MM-DD`.
pub(crate) fn parse_timestamp(text: &str) -> Option<Timestamp> {
    if let Ok(instant) = DateTime::parse_from_rfc3339(text) {
        return Some(Timestamp::from_micros(instant.timestamp_micros()));
    }
    let naive = [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
    ]
    .iter()
    .find_map(|format| NaiveDateTime::parse_from_str(text, format).ok())
    .or_else(|| {
        NaiveDate::parse_from_str(text, "%Y-%m-%d")
            .ok()
            .and_then(|date| date.and_hms_opt(0, 0, 0))
    })?;
    Some(Timestamp::from_micros(naive.and_utc().timestamp_micros()))
}

/// An instant as RFC 3339 text in UTC (`2024-05-01T10:00:00Z`, with as many digits
/// of fraction as it needs).
pub(crate) fn format_timestamp(timestamp: Timestamp) -> String {
    DateTime::<Utc>::from_timestamp_micros(timestamp.micros())
        .map(|t| t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
        .unwrap_or_default()
}

/// Reads a text cell (a CSV field) as a value of `kind`; the empty text is null.
/// The error is the end of a sentence ("is not an integer").
pub(crate) fn from_text(text: &str, kind: FieldType) -> Result<Value, String> {
    if text.is_empty() {
        return Ok(Value::Null);
    }
    let trimmed = text.trim();
    let fail = |what: &str| format!("holds {}, which is not {what}", quoted(text));
    Ok(match kind {
        FieldType::Text => Value::Text(text.to_owned()),
        FieldType::Integer => Value::Int(trimmed.parse().map_err(|_| fail("an integer"))?),
        FieldType::Float => Value::Float(trimmed.parse().map_err(|_| fail("a number"))?),
        FieldType::Decimal => {
            Value::Decimal(Decimal::parse(trimmed).map_err(|_| fail("a decimal number"))?)
        }
        FieldType::Bool => match trimmed.to_ascii_lowercase().as_str() {
            "true" | "yes" | "1" => Value::Bool(true),
            "false" | "no" | "0" => Value::Bool(false),
            _ => return Err(fail("true or false")),
        },
        FieldType::Timestamp => {
            Value::Timestamp(parse_timestamp(trimmed).ok_or_else(|| fail("a timestamp"))?)
        }
        FieldType::Json => from_json(serde_json::from_str(trimmed).map_err(|_| fail("JSON"))?),
    })
}

/// A value as a text cell: null is empty, lists and maps are JSON, instants RFC 3339.
pub(crate) fn to_text(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::Bool(b) => b.to_string(),
        Value::Int(i) => i.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Decimal(d) => d.as_str().to_owned(),
        Value::Text(s) => s.clone(),
        Value::Timestamp(t) => format_timestamp(*t),
        Value::List(_) | Value::Map(_) => to_json(value).map(|j| j.to_string()).unwrap_or_default(),
    }
}

/// Reads a JSON value of a web app's record as a value of `kind` (`None`: as it is).
/// Instants and decimals travel in JSON as text (or numbers), and are read so.
pub(crate) fn from_json_typed(
    json: serde_json::Value,
    kind: Option<FieldType>,
) -> Result<Value, String> {
    match (kind, json) {
        (_, serde_json::Value::Null) => Ok(Value::Null),
        (Some(FieldType::Timestamp), serde_json::Value::String(s)) if s.is_empty() => {
            Ok(Value::Null)
        }
        (
            Some(
                kind @ (FieldType::Timestamp
                | FieldType::Decimal
                | FieldType::Integer
                | FieldType::Float
                | FieldType::Bool),
            ),
            serde_json::Value::String(s),
        ) => from_text(&s, kind),
        (Some(FieldType::Decimal), serde_json::Value::Number(n)) => {
            from_text(&n.to_string(), FieldType::Decimal)
        }
        (Some(FieldType::Integer), serde_json::Value::Number(n)) => n
            .as_i64()
            .map(Value::Int)
            .or_else(|| {
                n.as_f64().and_then(|f| {
                    (f.fract() == 0.0 && f.abs() < FLOAT_EXACT_INT_MAX as f64)
                        .then_some(Value::Int(f as i64))
                })
            })
            .ok_or_else(|| format!("holds {n}, which is not an integer")),
        (Some(FieldType::Float), serde_json::Value::Number(n)) => n
            .as_f64()
            .map(Value::Float)
            .ok_or_else(|| format!("holds {n}, which is not a number")),
        (Some(FieldType::Text), serde_json::Value::String(s)) => Ok(Value::Text(s)),
        (
            Some(FieldType::Text),
            other @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_)),
        ) => Ok(Value::Text(other.to_string())),
        (Some(FieldType::Bool), serde_json::Value::Bool(b)) => Ok(Value::Bool(b)),
        (Some(FieldType::Json) | None, json) => Ok(from_json(json)),
        (Some(kind), json) => Err(format!(
            "holds {}, which is not {}",
            quoted(&json.to_string()),
            kind.name()
        )),
    }
}

/// A value as JSON for a web app: instants as RFC 3339 text, decimals as text.
pub(crate) fn to_json_lenient(value: &Value) -> serde_json::Value {
    match value {
        Value::Timestamp(t) => serde_json::Value::String(format_timestamp(*t)),
        Value::Decimal(d) => serde_json::Value::String(d.as_str().to_owned()),
        Value::List(items) => serde_json::Value::Array(items.iter().map(to_json_lenient).collect()),
        Value::Map(map) => serde_json::Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), to_json_lenient(v)))
                .collect(),
        ),
        other => to_json(other).unwrap_or(serde_json::Value::Null),
    }
}

/// `text` quoted and shortened for a message.
fn quoted(text: &str) -> String {
    format!("{:?}", shorten(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_cells_read_by_type() {
        assert_eq!(from_text("", FieldType::Integer), Ok(Value::Null));
        assert_eq!(from_text(" 42 ", FieldType::Integer), Ok(Value::Int(42)));
        assert_eq!(
            from_text("4x2", FieldType::Integer),
            Err("holds \"4x2\", which is not an integer".to_owned())
        );
        let t = from_text("2024-05-01 10:00:00.5Z", FieldType::Timestamp).expect("instant");
        assert_eq!(to_text(&t), "2024-05-01T10:00:00.500Z");
        assert_eq!(from_text("yes", FieldType::Bool), Ok(Value::Bool(true)));
    }

    #[test]
    fn web_app_json_read_by_type() {
        let t = from_json_typed(
            serde_json::json!("2026-11-24 10:00:00.123Z"),
            Some(FieldType::Timestamp),
        );
        assert_eq!(
            to_json_lenient(&t.expect("instant")),
            serde_json::json!("2026-11-24T10:00:00.123Z")
        );
        assert_eq!(
            from_json_typed(serde_json::json!(3.0), Some(FieldType::Integer)),
            Ok(Value::Int(3))
        );
        assert!(from_json_typed(serde_json::json!("x"), Some(FieldType::Integer)).is_err());
        assert_eq!(
            from_json_typed(serde_json::json!(7), None),
            Ok(Value::Int(7))
        );
    }
}
