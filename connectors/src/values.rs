//! Value helpers every connector shares: JSON documents as field values, values
//! quoted in messages, keys as text, and SQL quoting.

use std::collections::BTreeMap;

use crdt_model::Value;

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
