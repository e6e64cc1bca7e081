//! One column ↔ one canonical field: the steps that convert its value each way.
//!
//! A field map is a list of steps in the order they apply from the tool's value to
//! the canonical one ([`FieldMap::read`]); [`FieldMap::write`] runs them backwards.
//! Steps that only shape what the tool is given (case, length) do nothing on the
//! way in, so the document keeps the fuller value.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::format::{Item, StrftimeItems};
use chrono::{DateTime, LocalResult, NaiveDate, NaiveDateTime, SecondsFormat, TimeZone, Utc};
use chrono_tz::Tz;
use connectors::FieldType;
use crdt_model::{Decimal, Timestamp, Value};
use rust_decimal::Decimal as Exact;

use super::MappingError;
use super::expr::Expr;
use crate::config::{Case, Direction};

/// How one column of a tool maps to one canonical field.
#[derive(Debug, Clone)]
pub(crate) struct FieldMap {
    /// The tool's column.
    pub(crate) column: String,
    /// The canonical field.
    pub(crate) field: String,
    /// Which way values go.
    pub(crate) direction: Direction,
    /// The steps, from the tool's value to the canonical one.
    pub(crate) steps: Vec<Step>,
    /// The expression whose value the column receives (a computed field).
    pub(crate) compute: Option<Expr>,
}

/// One step between a column's value and its field's value. Null passes every step
/// unchanged.
#[derive(Debug, Clone)]
pub(crate) enum Step {
    /// Text written into the tool is cut to this many characters.
    MaxLength(usize),
    /// Text written into the tool is put in this case.
    Case(Case),
    /// White space is trimmed from both ends of text, both ways.
    Trim,
    /// An integer count of `10^-scale` units ↔ an exact decimal.
    MinorUnits {
        /// Digits after the decimal point.
        scale: u32,
    },
    /// Text in `format` (RFC 3339 when `None`) ↔ a timestamp; text without an
    /// offset is a wall-clock time in `zone`.
    TextTimestamp {
        /// A strftime format, checked when compiled.
        format: Option<String>,
        /// The zone of wall-clock times.
        zone: Tz,
    },
    /// A timestamp column holding wall-clock time in `zone` ↔ an instant.
    WallClock {
        /// The zone.
        zone: Tz,
    },
    /// Two column values ↔ a boolean.
    Bool {
        /// The column's value for true.
        yes: Value,
        /// The column's value for false.
        no: Value,
    },
    /// Text holding a number ↔ an exact decimal.
    Number,
    /// A number ↔ its text; the column's number type.
    Text(NumberKind),
    /// The column holds the field's value times this factor.
    Factor(Exact, NumberKind),
    /// Enumerated values.
    Enum(EnumMap),
}

/// The kind of number a column holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NumberKind {
    /// An integer.
    Integer,
    /// A float.
    Float,
    /// An exact decimal.
    Decimal,
    /// Not known (no schema): integers where the value is one, else decimals.
    Any,
}

impl NumberKind {
    /// The kind of a column of type `field_type`.
    pub(crate) fn of(field_type: Option<FieldType>) -> NumberKind {
        match field_type {
            Some(FieldType::Integer) => NumberKind::Integer,
            Some(FieldType::Float) => NumberKind::Float,
            Some(FieldType::Decimal) => NumberKind::Decimal,
            _ => NumberKind::Any,
        }
    }
}

/// An enumeration's values, both ways.
#[derive(Debug, Clone)]
pub(crate) struct EnumMap {
    /// Column value → field value.
    pub(crate) to_field: BTreeMap<String, String>,
    /// Field value → column value.
    pub(crate) to_tool: BTreeMap<String, String>,
    /// The field's value for an unknown column value (else the value itself).
    pub(crate) default: Option<String>,
    /// The column's value for an unknown field value (else the value itself).
    pub(crate) tool_default: Option<String>,
    /// Whether the column holds integers.
    pub(crate) integer: bool,
}

impl FieldMap {
    /// A column synced as it is.
    pub(crate) fn plain(column: &str) -> FieldMap {
        FieldMap {
            column: column.to_owned(),
            field: column.to_owned(),
            direction: Direction::Both,
            steps: Vec::new(),
            compute: None,
        }
    }

    /// Whether the tool's value of the column is read into the document.
    pub(crate) fn reads(&self) -> bool {
        self.direction != Direction::IntoTool && self.compute.is_none()
    }

    /// Whether the column is written into the tool.
    pub(crate) fn writes(&self) -> bool {
        self.direction != Direction::OutOfTool
    }

    /// The canonical value of the column's value `value`.
    pub(crate) fn read(&self, value: &Value) -> Result<Value, MappingError> {
        let mut value = value.clone();
        for step in &self.steps {
            if value == Value::Null {
                break;
            }
            value = step.read(value).map_err(|problem| MappingError::Read {
                column: self.column.clone(),
                field: self.field.clone(),
                problem,
            })?;
        }
        Ok(value)
    }

    /// The column's value for the canonical value `value`.
    pub(crate) fn write(&self, value: &Value) -> Result<Value, MappingError> {
        let mut value = value.clone();
        for step in self.steps.iter().rev() {
            if value == Value::Null {
                break;
            }
            value = step.write(value).map_err(|problem| MappingError::Write {
                column: self.column.clone(),
                field: self.field.clone(),
                problem,
            })?;
        }
        Ok(value)
    }
}

impl Step {
    /// The step from the tool's side to the canonical side.
    fn read(&self, value: Value) -> Result<Value, String> {
        match self {
            Step::MaxLength(_) | Step::Case(_) => Ok(value),
            Step::Trim => Ok(trimmed(value)),
            Step::MinorUnits { scale } => match value {
                Value::Int(units) => decimal(Exact::new(units, *scale)),
                other => Err(expected("an integer count of minor units", &other)),
            },
            Step::TextTimestamp { format, zone } => match value {
                Value::Text(text) => parse_time(&text, format.as_deref(), *zone),
                other => Err(expected("text holding a time", &other)),
            },
            Step::WallClock { zone } => match value {
                Value::Timestamp(t) => {
                    let local = naive_of(t)?;
                    Ok(Value::Timestamp(instant_of(&local, *zone)?))
                }
                other => Err(expected("a timestamp", &other)),
            },
            Step::Bool { yes, no } => {
                if same(&value, yes) {
                    Ok(Value::Bool(true))
                } else if same(&value, no) {
                    Ok(Value::Bool(false))
                } else {
                    Err(format!(
                        "{} is neither the true value {yes} nor the false value {no}",
                        quoted(&value)
                    ))
                }
            }
            Step::Number => match value {
                Value::Text(text) => Decimal::parse(&text)
                    .map(Value::Decimal)
                    .map_err(|e| e.to_string()),
                other => Err(expected("text holding a number", &other)),
            },
            Step::Text(_) => match value {
                Value::Int(i) => Ok(Value::Text(i.to_string())),
                Value::Float(x) => Ok(Value::Text(x.to_string())),
                Value::Decimal(d) => Ok(Value::Text(d.as_str().to_owned())),
                other => Err(expected("a number", &other)),
            },
            Step::Factor(factor, _) => match value {
                Value::Float(x) => Ok(Value::Float(x / f64_of(*factor))),
                other => {
                    let exact = exact_of(&other)?;
                    let divided = exact
                        .checked_div(*factor)
                        .ok_or_else(|| format!("{} / {factor} overflows", quoted(&other)))?;
                    decimal(divided)
                }
            },
            Step::Enum(map) => {
                let text = enum_text(&value)?;
                Ok(Value::Text(match map.to_field.get(&text) {
                    Some(field) => field.clone(),
                    None => map.default.clone().unwrap_or(text),
                }))
            }
        }
    }

    /// The step from the canonical side to the tool's side.
    fn write(&self, value: Value) -> Result<Value, String> {
        match self {
            Step::MaxLength(max) => Ok(match value {
                Value::Text(text) if text.chars().count() > *max => {
                    Value::Text(text.chars().take(*max).collect())
                }
                other => other,
            }),
            Step::Case(case) => Ok(match value {
                Value::Text(text) => Value::Text(match case {
                    Case::Upper => text.to_uppercase(),
                    Case::Lower => text.to_lowercase(),
                }),
                other => other,
            }),
            Step::Trim => Ok(trimmed(value)),
            Step::MinorUnits { scale } => {
                let exact = exact_of(&value)?;
                let units = exact
                    .checked_mul(Exact::from(10_i64.pow(*scale)))
                    .filter(|units| units.fract().is_zero())
                    .and_then(|units| i64::try_from(units).ok())
                    .ok_or_else(|| {
                        format!(
                            "{} is not a whole number of minor units with {scale} decimal places",
                            quoted(&value)
                        )
                    })?;
                Ok(Value::Int(units))
            }
            Step::TextTimestamp { format, zone } => match value {
                Value::Timestamp(t) => format_time(t, format.as_deref(), *zone).map(Value::Text),
                other => Err(expected("a timestamp", &other)),
            },
            Step::WallClock { zone } => match value {
                Value::Timestamp(t) => {
                    let instant = utc_of(t)?;
                    let local = instant.with_timezone(zone).naive_local();
                    Ok(Value::Timestamp(Timestamp::from_micros(
                        local.and_utc().timestamp_micros(),
                    )))
                }
                other => Err(expected("a timestamp", &other)),
            },
            Step::Bool { yes, no } => match value {
                Value::Bool(true) => Ok(yes.clone()),
                Value::Bool(false) => Ok(no.clone()),
                other => Err(expected("a boolean", &other)),
            },
            Step::Number => match value {
                Value::Decimal(d) => Ok(Value::Text(d.as_str().to_owned())),
                Value::Int(i) => Ok(Value::Text(i.to_string())),
                Value::Float(x) => Ok(Value::Text(x.to_string())),
                other => Err(expected("a number", &other)),
            },
            Step::Text(kind) => match value {
                Value::Text(text) => number_of(text.trim(), *kind),
                other => Err(expected("text", &other)),
            },
            Step::Factor(factor, kind) => match value {
                Value::Float(x) => Ok(Value::Float(x * f64_of(*factor))),
                other => {
                    let exact = exact_of(&other)?;
                    let product = exact
                        .checked_mul(*factor)
                        .ok_or_else(|| format!("{} × {factor} overflows", quoted(&other)))?;
                    match kind {
                        NumberKind::Integer => product
                            .fract()
                            .is_zero()
                            .then(|| i64::try_from(product).ok())
                            .flatten()
                            .map(Value::Int)
                            .ok_or_else(|| {
                                format!("{} × {factor} is not a whole number", quoted(&other))
                            }),
                        NumberKind::Float => Ok(Value::Float(f64_of(product))),
                        NumberKind::Decimal | NumberKind::Any => decimal(product),
                    }
                }
            },
            Step::Enum(map) => {
                let text = enum_text(&value)?;
                let tool = match map.to_tool.get(&text) {
                    Some(tool) => tool.clone(),
                    None => map.tool_default.clone().unwrap_or(text),
                };
                if map.integer {
                    tool.parse::<i64>()
                        .map(Value::Int)
                        .map_err(|_| format!("{tool:?} is not an integer value of the column"))
                } else {
                    Ok(Value::Text(tool))
                }
            }
        }
    }
}

/// Whether a strftime format is valid (chrono refuses to print with a bad one).
pub(crate) fn format_is_valid(format: &str) -> bool {
    StrftimeItems::new(format).all(|item| !matches!(item, Item::Error))
}

/// Whether a format names an offset, so that its text is an instant by itself.
fn has_offset(format: &str) -> bool {
    ["%z", "%:z", "%::z", "%#z", "%+", "%s"]
        .iter()
        .any(|spec| format.contains(spec))
}

fn parse_time(text: &str, format: Option<&str>, zone: Tz) -> Result<Value, String> {
    let text = text.trim();
    let instant = match format {
        None => DateTime::parse_from_rfc3339(text)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| format!("{text:?} is not an RFC 3339 time: {e}"))?,
        Some(format) if has_offset(format) => DateTime::parse_from_str(text, format)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| format!("{text:?} does not fit the format {format:?}: {e}"))?,
        Some(format) => {
            let local = match NaiveDateTime::parse_from_str(text, format) {
                Ok(local) => local,
                Err(e) => match NaiveDate::parse_from_str(text, format) {
                    Ok(date) => date.and_time(chrono::NaiveTime::MIN),
                    Err(_) => {
                        return Err(format!("{text:?} does not fit the format {format:?}: {e}"));
                    }
                },
            };
            return instant_of(&local, zone).map(Value::Timestamp);
        }
    };
    Ok(Value::Timestamp(Timestamp::from_micros(
        instant.timestamp_micros(),
    )))
}

fn format_time(t: Timestamp, format: Option<&str>, zone: Tz) -> Result<String, String> {
    let local = utc_of(t)?.with_timezone(&zone);
    match format {
        None => Ok(local.to_rfc3339_opts(SecondsFormat::AutoSi, zone == Tz::UTC)),
        Some(format) => {
            let mut text = String::new();
            write!(text, "{}", local.format(format))
                .map_err(|_| format!("the format {format:?} cannot print {local}"))?;
            Ok(text)
        }
    }
}

/// The instant of wall-clock time `local` in `zone`: the earlier one where the
/// clock is set back and the time happens twice.
fn instant_of(local: &NaiveDateTime, zone: Tz) -> Result<Timestamp, String> {
    match zone.from_local_datetime(local) {
        LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => {
            Ok(Timestamp::from_micros(t.timestamp_micros()))
        }
        LocalResult::None => Err(format!(
            "{local} does not exist in {zone} (the clocks skip it)"
        )),
    }
}

fn utc_of(t: Timestamp) -> Result<DateTime<Utc>, String> {
    DateTime::from_timestamp_micros(t.micros())
        .ok_or_else(|| format!("@{}us is out of range", t.micros()))
}

fn naive_of(t: Timestamp) -> Result<NaiveDateTime, String> {
    utc_of(t).map(|t| t.naive_utc())
}

fn trimmed(value: Value) -> Value {
    match value {
        Value::Text(text) if text.trim().len() != text.len() => Value::Text(text.trim().to_owned()),
        other => other,
    }
}

/// Whether a column's value is the configured `expected` value (numbers compared
/// by value, text after trimming).
fn same(value: &Value, expected: &Value) -> bool {
    match (value, expected) {
        (Value::Text(a), Value::Text(b)) => a.trim() == b.trim(),
        (Value::Int(a), Value::Bool(b)) | (Value::Bool(b), Value::Int(a)) => *a == i64::from(*b),
        (a, b) => a == b,
    }
}

fn enum_text(value: &Value) -> Result<String, String> {
    match value {
        Value::Text(text) => Ok(text.clone()),
        Value::Int(i) => Ok(i.to_string()),
        other => Err(expected("text or an integer", other)),
    }
}

fn number_of(text: &str, kind: NumberKind) -> Result<Value, String> {
    let not = |what: &str| format!("{text:?} is not {what}");
    match kind {
        NumberKind::Integer => text.parse().map(Value::Int).map_err(|_| not("an integer")),
        NumberKind::Float => text.parse().map(Value::Float).map_err(|_| not("a number")),
        NumberKind::Decimal => Decimal::parse(text)
            .map(Value::Decimal)
            .map_err(|_| not("a number")),
        NumberKind::Any => match text.parse() {
            Ok(i) => Ok(Value::Int(i)),
            Err(_) => Decimal::parse(text)
                .map(Value::Decimal)
                .map_err(|_| not("a number")),
        },
    }
}

fn exact_of(value: &Value) -> Result<Exact, String> {
    match value {
        Value::Int(i) => Ok(Exact::from(*i)),
        Value::Decimal(d) => Exact::from_str_exact(d.as_str())
            .map_err(|e| format!("{} cannot be computed with exactly: {e}", d.as_str())),
        other => Err(expected("a number", other)),
    }
}

fn decimal(exact: Exact) -> Result<Value, String> {
    let text = exact.normalize().to_string();
    Decimal::parse(&text)
        .map(Value::Decimal)
        .map_err(|e| e.to_string())
}

fn f64_of(exact: Exact) -> f64 {
    exact.to_string().parse().unwrap_or(f64::NAN)
}

fn expected(what: &str, found: &Value) -> String {
    format!("expected {what}, found {}", quoted(found))
}

/// A value for a message, shortened.
fn quoted(value: &Value) -> String {
    const QUOTED_CHARS_MAX: usize = 64;
    let text = value.to_string();
    if text.chars().count() > QUOTED_CHARS_MAX {
        let cut: String = text.chars().take(QUOTED_CHARS_MAX).collect();
        format!("{} {cut}…", value.type_name())
    } else {
        format!("{} {text}", value.type_name())
    }
}
