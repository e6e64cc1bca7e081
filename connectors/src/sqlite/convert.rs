//! Conversions between stored SQLite values and canonical field values, one rule per
//! field type. Reading never guesses: a stored value that does not fit its column's
//! field type is reported, not coerced.

use chrono::{DateTime, Datelike, Utc};
use crdt_model::{Decimal, Timestamp, Value};
use rusqlite::types::{ToSqlOutput, Value as SqlValue, ValueRef};

use super::schema::Column;
use crate::FieldType;
#[cfg(test)]
use crate::values::QUOTED_CHARS_MAX;
pub(super) use crate::values::shorten;
use crate::values::{FLOAT_EXACT_INT_MAX, from_json, parse_timestamp, to_json};

/// Most significant digits a decimal may have to survive SQLite's NUMERIC affinity,
/// which stores numeric-looking text as a 64-bit float.
const NUMERIC_DIGITS_MAX: usize = 15;

/// Microseconds in one day.
const DAY_MICROS: i64 = 86_400_000_000;

/// Microseconds in one second.
const SECOND_MICROS: i64 = 1_000_000;

/// Reads the stored value `raw` as `column`'s field type; `None` when it does not fit.
pub(super) fn read_value(column: &Column, raw: ValueRef<'_>) -> Option<Value> {
    if raw == ValueRef::Null {
        return Some(Value::Null);
    }
    match column.field_type {
        FieldType::Integer => match raw {
            ValueRef::Integer(i) => Some(Value::Int(i)),
            ValueRef::Real(f) => exact_int(f).map(Value::Int),
            ValueRef::Text(t) => utf8(t)?.parse().ok().map(Value::Int),
            _ => None,
        },
        FieldType::Float => match raw {
            ValueRef::Integer(i) => Some(Value::Float(i as f64)),
            ValueRef::Real(f) => Some(Value::Float(f)),
            ValueRef::Text(t) => utf8(t)?
                .parse::<f64>()
                .ok()
                .filter(|f| f.is_finite())
                .map(Value::Float),
            _ => None,
        },
        FieldType::Decimal => match raw {
            ValueRef::Integer(i) => Decimal::parse(&i.to_string()).ok().map(Value::Decimal),
            // Rust prints the shortest text that reads back as the same float, never in
            // exponent notation, so a REAL becomes the decimal a person would write.
            ValueRef::Real(f) => Decimal::parse(&format!("{f}")).ok().map(Value::Decimal),
            ValueRef::Text(t) => Decimal::parse(utf8(t)?).ok().map(Value::Decimal),
            _ => None,
        },
        FieldType::Text => match raw {
            ValueRef::Text(t) => Some(Value::Text(utf8(t)?.to_owned())),
            _ => None,
        },
        FieldType::Bool => match raw {
            ValueRef::Integer(0) => Some(Value::Bool(false)),
            ValueRef::Integer(1) => Some(Value::Bool(true)),
            ValueRef::Text(t) => {
                let text = utf8(t)?;
                if text.eq_ignore_ascii_case("true") {
                    Some(Value::Bool(true))
                } else if text.eq_ignore_ascii_case("false") {
                    Some(Value::Bool(false))
                } else {
                    None
                }
            }
            _ => None,
        },
        FieldType::Timestamp => match raw {
            ValueRef::Text(t) => {
                let text = utf8(t)?;
                let value = parse_timestamp(text)?;
                // Written values take the form the column's stored values use.
                column.timestamp_style.set(TimestampStyle::of(text));
                Some(Value::Timestamp(value))
            }
            ValueRef::Integer(seconds) => {
                let micros = seconds.checked_mul(SECOND_MICROS)?;
                column.timestamp_style.set(TimestampStyle::UnixSeconds);
                Some(Value::Timestamp(Timestamp::from_micros(micros)))
            }
            _ => None,
        },
        FieldType::Json => match raw {
            ValueRef::Text(t) => serde_json::from_str(utf8(t)?).ok().map(from_json),
            // NUMERIC affinity stores a JSON number at the top level as a number.
            ValueRef::Integer(i) => Some(Value::Int(i)),
            ValueRef::Real(f) => Some(Value::Float(f)),
            _ => None,
        },
    }
}

/// Describes a stored value for a message: `text 'abc'`, `integer 7`, `NULL`.
pub(super) fn describe(raw: ValueRef<'_>) -> String {
    match raw {
        ValueRef::Null => "NULL".to_owned(),
        ValueRef::Integer(i) => format!("integer {i}"),
        ValueRef::Real(f) => format!("real {f}"),
        ValueRef::Text(t) => match std::str::from_utf8(t) {
            Ok(text) => format!("text '{}'", shorten(text)),
            Err(_) => format!("{} bytes of text that is not UTF-8", t.len()),
        },
        ValueRef::Blob(b) => format!("a blob of {} bytes", b.len()),
    }
}

/// Converts `value` into what `column` stores, or says why it does not fit.
///
/// The message completes "column `x` ...", e.g. "expects integer (declared INTEGER),
/// got text \"abc\"".
pub(super) fn write_value<'a>(
    column: &Column,
    value: &'a Value,
) -> Result<ToSqlOutput<'a>, String> {
    let owned = |v: SqlValue| Ok(ToSqlOutput::Owned(v));
    let mismatch = || {
        Err(format!(
            "expects {} ({}), got {} {}",
            column.field_type,
            column.declared_phrase(),
            value.type_name(),
            shorten(&value.to_string())
        ))
    };
    match (column.field_type, value) {
        (_, Value::Null) => owned(SqlValue::Null),
        (FieldType::Integer, Value::Int(i)) => owned(SqlValue::Integer(*i)),
        (FieldType::Float, Value::Float(f)) => {
            if f.is_nan() {
                Err("cannot hold NaN (SQLite would store NULL)".to_owned())
            } else {
                owned(SqlValue::Real(*f))
            }
        }
        (FieldType::Float, Value::Int(i)) => {
            if i.unsigned_abs() <= FLOAT_EXACT_INT_MAX {
                owned(SqlValue::Real(*i as f64))
            } else {
                Err(format!(
                    "is a float column, and {i} has more digits than a float holds exactly"
                ))
            }
        }
        (FieldType::Decimal, Value::Decimal(d)) => {
            if column.keeps_text || survives_numeric_affinity(d) {
                Ok(ToSqlOutput::Borrowed(ValueRef::Text(d.as_str().as_bytes())))
            } else {
                Err(format!(
                    "({}) has NUMERIC affinity, so SQLite would round {d} to a float; \
                     declare it DECIMAL_TEXT to store exact decimals",
                    column.declared_phrase()
                ))
            }
        }
        (FieldType::Decimal, Value::Int(i)) => owned(SqlValue::Integer(*i)),
        (FieldType::Text, Value::Text(text)) => {
            Ok(ToSqlOutput::Borrowed(ValueRef::Text(text.as_bytes())))
        }
        (FieldType::Bool, Value::Bool(b)) => owned(SqlValue::Integer(i64::from(*b))),
        (FieldType::Timestamp, Value::Timestamp(t)) => match column.timestamp_style.get().write(*t)
        {
            Some(value) => owned(value),
            None => Err(format!(
                "cannot hold the instant {} us after the epoch: it lies outside the years 0000 to 9999",
                t.micros()
            )),
        },
        (
            FieldType::Json,
            Value::List(_)
            | Value::Map(_)
            | Value::Bool(_)
            | Value::Int(_)
            | Value::Float(_)
            | Value::Text(_),
        ) => {
            let json = to_json(value)?;
            let text = serde_json::to_string(&json)
                .map_err(|error| format!("cannot hold the value as JSON: {error}"))?;
            owned(SqlValue::Text(text))
        }
        _ => mismatch(),
    }
}

/// True when SQLite's NUMERIC affinity, which turns numeric-looking text into an
/// INTEGER or a REAL, keeps `decimal` exactly: it fits an `i64`, or it has at most
/// [`NUMERIC_DIGITS_MAX`] significant digits and reads back unchanged from a float.
fn survives_numeric_affinity(decimal: &Decimal) -> bool {
    let text = decimal.as_str();
    if text.parse::<i64>().is_ok() {
        return true;
    }
    let digits: String = text.chars().filter(char::is_ascii_digit).collect();
    let significant = digits.trim_start_matches('0').trim_end_matches('0');
    if significant.len() > NUMERIC_DIGITS_MAX {
        return false;
    }
    text.parse::<f64>()
        .ok()
        .and_then(|f| Decimal::parse(&format!("{f}")).ok())
        .is_some_and(|back| &back == decimal)
}

/// The integer a float holds exactly, if it holds one within `i64` range.
fn exact_int(f: f64) -> Option<i64> {
    // -2^63 is exact as a float; 2^63 is the first float above i64::MAX.
    const BOUND: f64 = 9_223_372_036_854_775_808.0;
    (f.fract() == 0.0 && (-BOUND..BOUND).contains(&f)).then_some(f as i64)
}

/// Stored text as UTF-8, if it is.
fn utf8(bytes: &[u8]) -> Option<&str> {
    std::str::from_utf8(bytes).ok()
}

/// How a timestamp column writes its instants, learned from the values it holds, so
/// that an application reading its own database sees the format it uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TimestampStyle {
    /// Text: date, a separator (`' '` or `'T'`), time, at least `fraction` digits of
    /// fraction, and a zone suffix.
    Text {
        /// The separator between date and time.
        separator: char,
        /// Digits of fraction the column's values have (more are written when the
        /// instant needs them, never fewer).
        fraction: u8,
        /// Whether seconds are written (`HH:MM` when not).
        seconds: bool,
        /// The zone suffix.
        zone: Zone,
    },
    /// `YYYY-MM-DD` for an instant at midnight UTC; other instants as date and time.
    DateOnly,
    /// Whole seconds since the Unix epoch as an INTEGER.
    UnixSeconds,
}

/// The zone suffix of a text timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Zone {
    /// None: the text is read as UTC.
    Naive,
    /// `Z`.
    Utc,
    /// A fixed offset such as `+02:00`, in seconds east of UTC.
    Offset(i32),
}

impl TimestampStyle {
    /// SQLite's own format (`CURRENT_TIMESTAMP`, `datetime()`): `2024-03-01 09:15:00`.
    pub(super) const SQLITE: TimestampStyle = TimestampStyle::Text {
        separator: ' ',
        fraction: 0,
        seconds: true,
        zone: Zone::Naive,
    };

    /// The style of a stored text that [`parse_timestamp`] read.
    pub(super) fn of(text: &str) -> TimestampStyle {
        if text.len() == 10 {
            return TimestampStyle::DateOnly;
        }
        let separator = if text.as_bytes().get(10) == Some(&b'T') {
            'T'
        } else {
            ' '
        };
        let time = text.get(11..).unwrap_or_default();
        let zone_at = time.find(['Z', 'z', '+', '-']).unwrap_or(time.len());
        let (clock, suffix) = time.split_at(zone_at);
        let seconds = clock.len() >= 8;
        let fraction = clock
            .split_once('.')
            .map_or(0, |(_, digits)| digits.len().min(9) as u8);
        let zone = match suffix {
            "" => Zone::Naive,
            "Z" | "z" => Zone::Utc,
            offset => DateTime::parse_from_rfc3339(&format!("2000-01-01T00:00:00{offset}"))
                .map_or(Zone::Utc, |t| Zone::Offset(t.offset().local_minus_utc())),
        };
        TimestampStyle::Text {
            separator,
            fraction,
            seconds,
            zone,
        }
    }

    /// The stored form of `timestamp` in this style; `None` outside the years 0000
    /// to 9999. Precision is never lost: an instant with more fraction than the
    /// style shows gets the digits it needs.
    pub(super) fn write(self, timestamp: Timestamp) -> Option<SqlValue> {
        let instant = DateTime::<Utc>::from_timestamp_micros(timestamp.micros())?;
        if !(0..=9999).contains(&instant.year()) {
            return None;
        }
        let micros = timestamp.micros();
        let (separator, fraction, seconds, zone) = match self {
            TimestampStyle::UnixSeconds if micros.rem_euclid(SECOND_MICROS) == 0 => {
                return Some(SqlValue::Integer(micros.div_euclid(SECOND_MICROS)));
            }
            TimestampStyle::DateOnly if micros.rem_euclid(DAY_MICROS) == 0 => {
                return Some(SqlValue::Text(instant.format("%Y-%m-%d").to_string()));
            }
            TimestampStyle::UnixSeconds | TimestampStyle::DateOnly => (' ', 0, true, Zone::Naive),
            TimestampStyle::Text {
                separator,
                fraction,
                seconds,
                zone,
            } => (separator, fraction, seconds, zone),
        };
        let sub_second = micros.rem_euclid(SECOND_MICROS);
        let needed = if sub_second == 0 {
            0
        } else if sub_second % 1000 == 0 {
            3
        } else {
            6
        };
        let digits = fraction.max(needed);
        let seconds = seconds || digits > 0 || micros.rem_euclid(60 * SECOND_MICROS) != 0;
        let offset = match zone {
            Zone::Offset(seconds) => seconds,
            Zone::Naive | Zone::Utc => 0,
        };
        let local = instant.naive_utc() + chrono::TimeDelta::seconds(i64::from(offset));
        let mut text = local
            .format(if seconds {
                "%Y-%m-%d %H:%M:%S"
            } else {
                "%Y-%m-%d %H:%M"
            })
            .to_string();
        if separator == 'T' {
            text.replace_range(10..11, "T");
        }
        if digits > 0 {
            let nanos = format!("{:09}", sub_second * 1000);
            text.push('.');
            text.push_str(&nanos[..usize::from(digits.min(9))]);
        }
        match zone {
            Zone::Naive => {}
            Zone::Utc => text.push('Z'),
            Zone::Offset(offset) => {
                let sign = if offset < 0 { '-' } else { '+' };
                let offset = offset.unsigned_abs();
                text.push_str(&format!(
                    "{sign}{:02}:{:02}",
                    offset / 3600,
                    offset % 3600 / 60
                ));
            }
        }
        Some(SqlValue::Text(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn micros(text: &str) -> Option<i64> {
        parse_timestamp(text).map(Timestamp::micros)
    }

    #[test]
    fn timestamps_parse_in_every_supported_format() {
        let base = 1_714_557_600_000_000; // 2024-05-01T10:00:00Z
        assert_eq!(micros("2024-05-01T10:00:00Z"), Some(base));
        assert_eq!(micros("2024-05-01T12:00:00+02:00"), Some(base));
        assert_eq!(micros("2024-05-01T10:00:00.25Z"), Some(base + 250_000));
        assert_eq!(micros("2024-05-01 10:00:00"), Some(base));
        assert_eq!(micros("2024-05-01 10:00:00.000001"), Some(base + 1));
        assert_eq!(micros("2024-05-01T10:00:00"), Some(base));
        assert_eq!(micros("2024-05-01 10:00"), Some(base));
        assert_eq!(micros("2024-05-01"), Some(base - 10 * 3_600_000_000));
        assert_eq!(micros("yesterday"), None);
        assert_eq!(micros("2024-13-01"), None);
    }

    fn written(style: TimestampStyle, micros: i64) -> Option<SqlValue> {
        style.write(Timestamp::from_micros(micros))
    }

    fn text(value: &str) -> Option<SqlValue> {
        Some(SqlValue::Text(value.to_owned()))
    }

    /// Regression: a value written in A as `2024-03-01 09:15:00` arrived in B as
    /// `2024-03-01T09:15:00.000000Z`. Written values take the column's own format.
    #[test]
    fn timestamps_are_written_in_the_format_the_column_uses() {
        let base = micros("2024-03-01 09:15:00").expect("parses");
        for stored in [
            "2024-03-01 09:15:00",
            "2024-03-01T09:15:00Z",
            "2024-03-01T09:15:00.000Z",
            "2024-03-01T10:15:00+01:00",
            "2024-03-01 09:15",
        ] {
            let style = TimestampStyle::of(stored);
            assert_eq!(written(style, base), text(stored), "{stored}");
            assert_eq!(micros(stored), Some(base), "{stored}");
        }
        assert_eq!(
            written(TimestampStyle::SQLITE, base),
            text("2024-03-01 09:15:00")
        );
        // More precision than the column shows is kept, never cut.
        assert_eq!(
            written(TimestampStyle::SQLITE, base + 250_000),
            text("2024-03-01 09:15:00.250")
        );
        assert_eq!(
            written(TimestampStyle::of("2024-03-01 09:15"), base + 1),
            text("2024-03-01 09:15:00.000001")
        );
        let midnight = micros("2024-05-01").expect("parses");
        assert_eq!(
            written(TimestampStyle::DateOnly, midnight),
            text("2024-05-01")
        );
        assert_eq!(
            written(TimestampStyle::DateOnly, midnight + 1_000_000),
            text("2024-05-01 00:00:01")
        );
        assert_eq!(
            written(TimestampStyle::UnixSeconds, base),
            Some(SqlValue::Integer(base / 1_000_000))
        );
        assert_eq!(written(TimestampStyle::SQLITE, i64::MAX), None);
    }

    #[test]
    fn numeric_affinity_keeps_short_decimals_only() {
        let fits = |text: &str| survives_numeric_affinity(&Decimal::parse(text).expect(text));
        assert!(fits("12.5"));
        assert!(fits("0.1"));
        assert!(fits("-123456789012.345"));
        assert!(fits("9223372036854775807"));
        assert!(fits("120000000000000000000"));
        assert!(!fits("12345678901234567890.123456789"));
        assert!(!fits("0.1234567890123456"));
    }

    #[test]
    fn floats_convert_to_integers_only_when_exact() {
        assert_eq!(exact_int(7.0), Some(7));
        assert_eq!(exact_int(-9_223_372_036_854_775_808.0), Some(i64::MIN));
        assert_eq!(exact_int(9_223_372_036_854_775_808.0), None);
        assert_eq!(exact_int(7.5), None);
        assert_eq!(exact_int(f64::NAN), None);
    }

    #[test]
    fn shorten_cuts_long_text() {
        assert_eq!(shorten("abc"), "abc");
        let long = "é".repeat(QUOTED_CHARS_MAX + 1);
        assert_eq!(shorten(&long), format!("{}…", "é".repeat(QUOTED_CHARS_MAX)));
    }
}
