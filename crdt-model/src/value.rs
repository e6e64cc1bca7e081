//! Typed field values: what a canonical record holds, independent of any tool.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A canonical record: field name to value, ordered by name.
pub type Record = BTreeMap<String, Value>;

/// One field value of a canonical record.
///
/// Lists and maps nest, so a calendar event can carry its attendees and the
/// exceptions of a recurring series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    /// No value.
    Null,
    /// True or false.
    Bool(bool),
    /// A signed 64-bit integer.
    Int(i64),
    /// A 64-bit IEEE float.
    Float(f64),
    /// An exact decimal number, never rounded through a float.
    Decimal(Decimal),
    /// UTF-8 text.
    Text(String),
    /// An instant, in microseconds since the Unix epoch (UTC).
    Timestamp(Timestamp),
    /// An ordered list of values.
    List(Vec<Value>),
    /// A map from names to values.
    Map(BTreeMap<String, Value>),
}

impl Value {
    /// The name of this value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Int(_) => "integer",
            Value::Float(_) => "float",
            Value::Decimal(_) => "decimal",
            Value::Text(_) => "text",
            Value::Timestamp(_) => "timestamp",
            Value::List(_) => "list",
            Value::Map(_) => "map",
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("null"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Decimal(d) => f.write_str(d.as_str()),
            Value::Text(s) => write!(f, "{s:?}"),
            Value::Timestamp(t) => write!(f, "@{}us", t.micros()),
            Value::List(items) => {
                f.write_str("[")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{item}")?;
                }
                f.write_str("]")
            }
            Value::Map(map) => {
                f.write_str("{")?;
                for (i, (k, v)) in map.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{k}: {v}")?;
                }
                f.write_str("}")
            }
        }
    }
}

/// An instant in microseconds since the Unix epoch, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The instant `micros` microseconds after the Unix epoch.
    pub fn from_micros(micros: i64) -> Timestamp {
        Timestamp(micros)
    }

    /// Microseconds since the Unix epoch.
    pub fn micros(self) -> i64 {
        self.0
    }
}

/// An exact decimal number in canonical form: an optional `-`, digits without
/// leading zeros, and an optional fraction without trailing zeros (`12.5`, `-0.25`,
/// `0`). Two decimals are equal exactly when their values are.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Decimal(String);

/// A text that is not a decimal number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a decimal number")]
pub struct DecimalError(pub String);

impl Decimal {
    /// Parses `text` (`-12.50`, `+3`, `.5`, `7.`, `1e3` is refused) into canonical form.
    pub fn parse(text: &str) -> Result<Decimal, DecimalError> {
        let invalid = || DecimalError(text.to_owned());
        let trimmed = text.trim();
        let (negative, digits) = match trimmed.as_bytes().first() {
            Some(b'-') => (true, &trimmed[1..]),
            Some(b'+') => (false, &trimmed[1..]),
            _ => (false, trimmed),
        };
        let (int_part, frac_part) = match digits.split_once('.') {
            Some((i, f)) => (i, f),
            None => (digits, ""),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(invalid());
        }
        if !int_part.bytes().all(|b| b.is_ascii_digit())
            || !frac_part.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(invalid());
        }
        let int_part = int_part.trim_start_matches('0');
        let frac_part = frac_part.trim_end_matches('0');
        let mut canonical = String::with_capacity(trimmed.len() + 1);
        let zero = int_part.is_empty() && frac_part.is_empty();
        if negative && !zero {
            canonical.push('-');
        }
        canonical.push_str(if int_part.is_empty() { "0" } else { int_part });
        if !frac_part.is_empty() {
            canonical.push('.');
            canonical.push_str(frac_part);
        }
        Ok(Decimal(canonical))
    }

    /// The canonical text of this decimal.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Decimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_canonical_form() {
        let cases = [
            ("12.50", "12.5"),
            ("-0.250", "-0.25"),
            ("+007", "7"),
            (".5", "0.5"),
            ("7.", "7"),
            ("-0.000", "0"),
            (
                "123456789012345678901234567890.000000000000000000001",
                "123456789012345678901234567890.000000000000000000001",
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(
                Decimal::parse(input).map(|d| d.0),
                Ok(expected.to_owned()),
                "{input}"
            );
        }
        for bad in ["", "-", ".", "1e3", "1.2.3", "abc", "1 2"] {
            assert!(Decimal::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
