//! Conversions between PostgreSQL values and canonical field values. Values cross
//! the wire as text: read as `column::text`, written as `CAST($n::text AS type)`, so
//! the server parses and checks every value itself, and the connection's settings
//! (`DateStyle = ISO`, `TimeZone = UTC`, `extra_float_digits = 1`) fix how it prints
//! them. Reading never guesses: a value that does not fit is reported.

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, Utc};
use crdt_model::{Decimal, Timestamp, Value};

use super::schema::{Column, PgType};
use crate::values::{FLOAT_EXACT_INT_MAX, from_json, shorten, to_json};

/// Microseconds in one day.
const DAY_MICROS: i64 = 86_400_000_000;

/// Reads the text PostgreSQL printed for a value of `column`; `None` when it does not
/// fit the field type (an infinite timestamp, a NaN).
pub(super) fn read_value(column: &Column, text: Option<&str>) -> Option<Value> {
    let Some(text) = text else {
        return Some(Value::Null);
    };
    match column.pg_type {
        PgType::Integer => text.parse().ok().map(Value::Int),
        PgType::Numeric { .. } => Decimal::parse(text).ok().map(Value::Decimal),
        PgType::Float => text
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .map(Value::Float),
        PgType::Bool => match text {
            "true" | "t" => Some(Value::Bool(true)),
            "false" | "f" => Some(Value::Bool(false)),
            _ => None,
        },
        PgType::Text { .. } | PgType::Uuid => Some(Value::Text(text.to_owned())),
        PgType::Timestamp => NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f")
            .ok()
            .map(|naive| {
                Value::Timestamp(Timestamp::from_micros(naive.and_utc().timestamp_micros()))
            }),
        PgType::Timestamptz => DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z")
            .ok()
            .map(|instant| Value::Timestamp(Timestamp::from_micros(instant.timestamp_micros()))),
        PgType::Date => NaiveDate::parse_from_str(text, "%Y-%m-%d")
            .ok()
            .and_then(|date| date.and_hms_opt(0, 0, 0))
            .map(|naive| {
                Value::Timestamp(Timestamp::from_micros(naive.and_utc().timestamp_micros()))
            }),
        PgType::Json => serde_json::from_str(text).ok().map(from_json),
    }
}

/// Converts `value` into the text PostgreSQL parses as `column`'s type (`None` is
/// NULL), or says why it does not fit: the message completes "column `x` ...".
pub(super) fn write_value(column: &Column, value: &Value) -> Result<Option<String>, String> {
    let mismatch = || {
        Err(format!(
            "expects {} (declared {}), got {} {}",
            column.pg_type.field_type(),
            column.declared,
            value.type_name(),
            shorten(&value.to_string())
        ))
    };
    let text = match (column.pg_type, value) {
        (_, Value::Null) => return Ok(None),
        (PgType::Integer, Value::Int(i)) => i.to_string(),
        (PgType::Numeric { precision, scale }, Value::Decimal(d)) => {
            fits_numeric(d.as_str(), precision, scale, &column.declared)?;
            d.as_str().to_owned()
        }
        (PgType::Numeric { precision, scale }, Value::Int(i)) => {
            let text = i.to_string();
            fits_numeric(&text, precision, scale, &column.declared)?;
            text
        }
        (PgType::Float, Value::Float(f)) => {
            if !f.is_finite() {
                return Err(format!("cannot hold {f}: only finite floats are synced"));
            }
            // Rust prints the shortest text that reads back as the same float.
            format!("{f}")
        }
        (PgType::Float, Value::Int(i)) => {
            if i.unsigned_abs() > FLOAT_EXACT_INT_MAX {
                return Err(format!(
                    "is a float column, and {i} has more digits than a float holds exactly"
                ));
            }
            i.to_string()
        }
        (PgType::Bool, Value::Bool(b)) => b.to_string(),
        (PgType::Text { max_chars }, Value::Text(text)) => {
            if let Some(max) = max_chars {
                let chars = text.chars().count();
                if chars > max as usize {
                    return Err(format!(
                        "(declared {}) holds at most {max} characters, and the value has {chars}: {}",
                        column.declared,
                        shorten(text)
                    ));
                }
            }
            text.clone()
        }
        (PgType::Uuid, Value::Text(text)) => text.clone(),
        (PgType::Timestamp | PgType::Timestamptz | PgType::Date, Value::Timestamp(t)) => {
            write_timestamp(column.pg_type, *t)?
        }
        (
            PgType::Json,
            Value::List(_)
            | Value::Map(_)
            | Value::Bool(_)
            | Value::Int(_)
            | Value::Float(_)
            | Value::Text(_),
        ) => {
            let json = to_json(value)?;
            serde_json::to_string(&json)
                .map_err(|error| format!("cannot hold the value as JSON: {error}"))?
        }
        _ => return mismatch(),
    };
    Ok(Some(text))
}

/// Refuses a decimal that `numeric(precision, scale)` would round or refuse: more
/// fraction digits than the scale, or more integer digits than precision − scale.
fn fits_numeric(
    text: &str,
    precision: Option<u32>,
    scale: Option<u32>,
    declared: &str,
) -> Result<(), String> {
    let (Some(precision), Some(scale)) = (precision, scale) else {
        return Ok(());
    };
    let digits = text.trim_start_matches('-');
    let (int_part, frac_part) = digits.split_once('.').unwrap_or((digits, ""));
    let int_digits = int_part.trim_start_matches('0').len();
    if frac_part.len() > scale as usize {
        return Err(format!(
            "(declared {declared}) keeps {scale} decimal places, so {text} would be rounded"
        ));
    }
    if int_digits > precision.saturating_sub(scale) as usize {
        return Err(format!(
            "(declared {declared}) holds at most {} digits before the point, and {text} has {int_digits}",
            precision.saturating_sub(scale)
        ));
    }
    Ok(())
}

/// An instant as PostgreSQL reads it for a timestamp, timestamptz or date column.
fn write_timestamp(pg_type: PgType, timestamp: Timestamp) -> Result<String, String> {
    let micros = timestamp.micros();
    let instant = DateTime::<Utc>::from_timestamp_micros(micros)
        .filter(|instant| (1..=9999).contains(&instant.year()))
        .ok_or_else(|| {
            format!("cannot hold the instant {micros} us after the epoch: it lies outside the years 0001 to 9999")
        })?;
    let text = match pg_type {
        PgType::Date => {
            if micros.rem_euclid(DAY_MICROS) != 0 {
                return Err(format!(
                    "is a date, and {} has a time of day",
                    instant.format("%Y-%m-%d %H:%M:%S%.6f UTC")
                ));
            }
            instant.format("%Y-%m-%d").to_string()
        }
        PgType::Timestamptz => instant.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string(),
        _ => instant.format("%Y-%m-%d %H:%M:%S%.6f").to_string(),
    };
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(pg_type: PgType, declared: &str) -> Column {
        Column {
            field: "c".to_owned(),
            sql_name: "\"c\"".to_owned(),
            declared: declared.to_owned(),
            cast: declared.to_owned(),
            pg_type,
        }
    }

    #[test]
    fn timestamps_read_in_the_forms_postgres_prints() {
        let base = 1_714_557_600_000_000; // 2024-05-01T10:00:00Z
        let tz = column(PgType::Timestamptz, "timestamp with time zone");
        let read = |c: &Column, text| match read_value(c, Some(text)) {
            Some(Value::Timestamp(t)) => Some(t.micros()),
            _ => None,
        };
        assert_eq!(read(&tz, "2024-05-01 10:00:00+00"), Some(base));
        assert_eq!(read(&tz, "2024-05-01 12:00:00.25+02"), Some(base + 250_000));
        assert_eq!(read(&tz, "2024-05-01 15:30:00+05:30"), Some(base));
        assert_eq!(read(&tz, "infinity"), None);
        let naive = column(PgType::Timestamp, "timestamp without time zone");
        assert_eq!(read(&naive, "2024-05-01 10:00:00.000001"), Some(base + 1));
        let date = column(PgType::Date, "date");
        assert_eq!(read(&date, "2024-05-01"), Some(base - 36_000_000_000));
    }

    #[test]
    fn written_timestamps_read_back_as_the_same_instant() {
        let instant = Timestamp::from_micros(1_714_557_600_123_456);
        for pg_type in [PgType::Timestamp, PgType::Timestamptz] {
            let c = column(pg_type, "timestamp");
            let text = write_value(&c, &Value::Timestamp(instant))
                .expect("fits")
                .expect("not null");
            assert_eq!(read_value(&c, Some(&text)), Some(Value::Timestamp(instant)));
        }
        let date = column(PgType::Date, "date");
        let err = write_value(&date, &Value::Timestamp(instant)).expect_err("time of day");
        assert!(err.contains("time of day"), "{err}");
    }

    #[test]
    fn numeric_limits_refuse_instead_of_rounding() {
        let c = column(
            PgType::Numeric {
                precision: Some(12),
                scale: Some(2),
            },
            "numeric(12,2)",
        );
        let value = |text| Value::Decimal(Decimal::parse(text).expect("decimal"));
        assert_eq!(
            write_value(&c, &value("1234567890.5")),
            Ok(Some("1234567890.5".to_owned()))
        );
        let err = write_value(&c, &value("1.005")).expect_err("rounded");
        assert!(err.contains("2 decimal places"), "{err}");
        let err = write_value(&c, &value("12345678901")).expect_err("too long");
        assert!(err.contains("10 digits before the point"), "{err}");
    }

    #[test]
    fn varchar_limits_count_characters() {
        let c = column(PgType::Text { max_chars: Some(3) }, "character varying(3)");
        assert!(write_value(&c, &Value::Text("été".to_owned())).is_ok());
        let err = write_value(&c, &Value::Text("étés".to_owned())).expect_err("too long");
        assert!(err.contains("at most 3 characters"), "{err}");
    }
}
