//! One calendar resource (an event with its overridden occurrences) as one record,
//! and back.
//!
//! The record is the event's meaning, in a normal form: what a server rewrites
//! (property order, line folding, `DTSTAMP`, `SEQUENCE`, `LAST-MODIFIED`, the
//! `VTIMEZONE` it adds) reads back as the same record, so a server's rewrite is never
//! taken for an edit.
//!
//! - `start` and `end` are an instant ([`Value::Timestamp`]) for UTC and zoned
//!   times, with the zone's IANA name in `start_zone`/`end_zone` (Windows and
//!   prefixed names are mapped); text `YYYY-MM-DDTHH:MM:SS` for a floating time;
//!   text `YYYY-MM-DD` for an all-day date (the end exclusive). A `DURATION` is read
//!   as the end it gives.
//! - `rrule` is the rule as one text: never merged part by part.
//! - `exdates` and `rdates` are sets: maps from the normalised instant to `true`:
//!   `YYYYMMDDTHHMMSSZ` in UTC for zoned and UTC times, `YYYYMMDDTHHMMSS` for
//!   floating times, `YYYYMMDD` for dates.
//! - `overrides` maps the normalised `RECURRENCE-ID` of each overridden occurrence
//!   to its own record (the same fields, but no rule), so each merges field by field.
//! - `attendees` maps each address (lower case) to its parameters; `organizer` is the
//!   address with its parameters.
//! - `extra` holds, verbatim, the properties and components (`X-…`, `VALARM`, ...)
//!   the record has no field for; `params` the parameters of known properties that
//!   have no field (`LANGUAGE`, `X-…`), per property.
//!
//! Writing derives `DTSTAMP`, `SEQUENCE` and the `VTIMEZONE` of every zone used, and
//! marks every attendee and the organizer `SCHEDULE-AGENT=CLIENT`, so that a server
//! never sends invitations because Concord copied an event.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::str::FromStr;

use calcard::common::timezone::Tz;
use calcard::icalendar::{
    ICalendar, ICalendarComponent, ICalendarComponentType, ICalendarEntry, ICalendarValue,
};
use calcard::{Entry, Parser};
use chrono::{DateTime, Duration, NaiveDate, NaiveDateTime, TimeZone, Utc};
use crdt_model::{Record, Timestamp, Value};

/// Every field of an event record, in the order they are listed.
pub const EVENT_FIELDS: [&str; 17] = [
    "uid",
    "summary",
    "description",
    "location",
    "status",
    "start",
    "start_zone",
    "end",
    "end_zone",
    "rrule",
    "exdates",
    "rdates",
    "overrides",
    "attendees",
    "organizer",
    "extra",
    "params",
];

/// The fields an overridden occurrence has (no rule, no identity).
const OVERRIDE_FIELDS: [&str; 12] = [
    "summary",
    "description",
    "location",
    "status",
    "start",
    "start_zone",
    "end",
    "end_zone",
    "attendees",
    "organizer",
    "extra",
    "params",
];

/// Fields whose value is a map (possibly empty), never null.
const MAP_FIELDS: [&str; 6] = [
    "exdates",
    "rdates",
    "overrides",
    "attendees",
    "params",
    "organizer",
];

/// Properties written from the record or derived when writing: what is not one of
/// these goes to `extra`.
const DERIVED: [&str; 4] = ["DTSTAMP", "SEQUENCE", "LAST-MODIFIED", "CREATED"];

/// Attendee parameters that belong to a server's scheduling, never synced.
const SCHEDULING_PARAMS: [&str; 3] = ["schedule-agent", "schedule-status", "schedule-force-send"];

/// Why a resource could not be read as an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EventError(pub String);

fn err(message: impl Into<String>) -> EventError {
    EventError(message.into())
}

/// A time as iCalendar has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum When {
    /// An instant, and the zone it was given in (`None`: UTC).
    Instant(DateTime<Utc>, Option<chrono_tz::Tz>),
    /// A wall-clock time in no zone.
    Floating(NaiveDateTime),
    /// A whole day.
    Date(NaiveDate),
}

impl When {
    /// The time's field values: the time, and its zone.
    fn values(self) -> (Value, Value) {
        match self {
            When::Instant(at, zone) => (
                Value::Timestamp(Timestamp::from_micros(at.timestamp_micros())),
                zone.map_or(Value::Null, |z| Value::Text(z.name().to_owned())),
            ),
            When::Floating(at) => (
                Value::Text(at.format("%Y-%m-%dT%H:%M:%S").to_string()),
                Value::Null,
            ),
            When::Date(day) => (Value::Text(day.format("%Y-%m-%d").to_string()), Value::Null),
        }
    }

    /// The time of field values `time` and `zone`.
    fn of(time: &Value, zone: &Value) -> Result<Option<When>, EventError> {
        let zone = match zone {
            Value::Text(name) => Some(
                chrono_tz::Tz::from_str(name)
                    .map_err(|_| err(format!("`{name}` is not a time zone")))?,
            ),
            _ => None,
        };
        Ok(Some(match time {
            Value::Null => return Ok(None),
            Value::Timestamp(t) => When::Instant(
                DateTime::from_timestamp_micros(t.micros())
                    .ok_or_else(|| err("a time out of range"))?,
                zone,
            ),
            Value::Text(text) => {
                if let Ok(day) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
                    When::Date(day)
                } else if let Ok(at) = NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S") {
                    match zone {
                        Some(zone) => When::Instant(local_instant(zone, at)?, Some(zone)),
                        None => When::Floating(at),
                    }
                } else {
                    return Err(err(format!(
                        "`{text}` is neither a date (YYYY-MM-DD) nor a time (YYYY-MM-DDTHH:MM:SS)"
                    )));
                }
            }
            other => {
                return Err(err(format!(
                    "a time is a timestamp or text, not {}",
                    other.type_name()
                )));
            }
        }))
    }

    /// The normalised key of this time in a set of instants: UTC for instants.
    fn key(self) -> String {
        match self {
            When::Instant(at, _) => at.format("%Y%m%dT%H%M%SZ").to_string(),
            When::Floating(at) => at.format("%Y%m%dT%H%M%S").to_string(),
            When::Date(day) => day.format("%Y%m%d").to_string(),
        }
    }

    /// Reads a set key back, given in the zone of `like` (the event's start).
    fn from_key(key: &str, like: Option<When>) -> Result<When, EventError> {
        let zone = match like {
            Some(When::Instant(_, zone)) => zone,
            _ => None,
        };
        if let Some(utc) = key.strip_suffix('Z') {
            let at = NaiveDateTime::parse_from_str(utc, "%Y%m%dT%H%M%S")
                .map_err(|_| err(format!("`{key}` is not an instant")))?;
            return Ok(When::Instant(at.and_utc(), zone));
        }
        if let Ok(at) = NaiveDateTime::parse_from_str(key, "%Y%m%dT%H%M%S") {
            return Ok(When::Floating(at));
        }
        NaiveDate::parse_from_str(key, "%Y%m%d")
            .map(When::Date)
            .map_err(|_| err(format!("`{key}` is not a date or time")))
    }

    /// The property's parameters and value text.
    fn ical(self) -> (String, String) {
        match self {
            When::Instant(at, None) => (String::new(), at.format("%Y%m%dT%H%M%SZ").to_string()),
            When::Instant(at, Some(zone)) => (
                format!(";TZID={}", zone.name()),
                at.with_timezone(&zone)
                    .naive_local()
                    .format("%Y%m%dT%H%M%S")
                    .to_string(),
            ),
            When::Floating(at) => (String::new(), at.format("%Y%m%dT%H%M%S").to_string()),
            When::Date(day) => (";VALUE=DATE".to_owned(), day.format("%Y%m%d").to_string()),
        }
    }

    fn plus(self, duration: Duration) -> When {
        match self {
            When::Instant(at, zone) => When::Instant(at + duration, zone),
            When::Floating(at) => When::Floating(at + duration),
            When::Date(day) => When::Date(day + duration),
        }
    }
}

/// The instant a wall-clock time in `zone` names; in a gap (clocks moved forward)
/// the time after it, in an overlap the earlier one.
fn local_instant(zone: chrono_tz::Tz, at: NaiveDateTime) -> Result<DateTime<Utc>, EventError> {
    let local = zone
        .from_local_datetime(&at)
        .earliest()
        .or_else(|| {
            zone.from_local_datetime(&(at + Duration::hours(1)))
                .earliest()
        })
        .ok_or_else(|| err(format!("{at} does not exist in {}", zone.name())))?;
    Ok(local.with_timezone(&Utc))
}

/// How the zones of one resource resolve: by name (IANA, Windows, prefixed), or by
/// the resource's own `VTIMEZONE`.
#[derive(Default)]
struct Resolver {
    own: Option<calcard::icalendar::timezone::TzResolver<String>>,
}

impl Resolver {
    fn zone(&self, tzid: &str) -> Result<Option<chrono_tz::Tz>, EventError> {
        let tz = match &self.own {
            Some(own) => own.resolve(tzid),
            None => Tz::from_str(tzid).ok(),
        };
        match tz {
            Some(Tz::Tz(zone)) => Ok(Some(zone)),
            // A zone known only by a fixed offset: the instant is kept, in UTC.
            Some(Tz::Fixed(_)) => Ok(None),
            Some(Tz::Floating) | None => Err(err(format!("unknown time zone `{tzid}`"))),
        }
    }
}

fn parse_when(value: &str, tzid: Option<&str>, zones: &Resolver) -> Result<When, EventError> {
    let value = value.trim();
    if value.len() == 8 {
        return NaiveDate::parse_from_str(value, "%Y%m%d")
            .map(When::Date)
            .map_err(|_| err(format!("`{value}` is not a date")));
    }
    if let Some(utc) = value.strip_suffix(['Z', 'z']) {
        let at = NaiveDateTime::parse_from_str(utc, "%Y%m%dT%H%M%S")
            .map_err(|_| err(format!("`{value}` is not a time")))?;
        return Ok(When::Instant(at.and_utc(), None));
    }
    let at = NaiveDateTime::parse_from_str(value, "%Y%m%dT%H%M%S")
        .map_err(|_| err(format!("`{value}` is not a time")))?;
    let Some(tzid) = tzid else {
        return Ok(When::Floating(at));
    };
    match zones.zone(tzid)? {
        Some(zone) => Ok(When::Instant(local_instant(zone, at)?, Some(zone))),
        None => {
            let offset = zones
                .own
                .as_ref()
                .and_then(|own| own.resolve(tzid))
                .and_then(|tz| tz.from_local_datetime(&at).earliest())
                .ok_or_else(|| err(format!("{at} does not exist in `{tzid}`")))?;
            Ok(When::Instant(offset.with_timezone(&Utc), None))
        }
    }
}

/// One content line, unfolded: `NAME;PARAMS:VALUE`.
struct Line {
    name: String,
    /// Parameters in order, names upper case, values unquoted.
    params: Vec<(String, String)>,
    value: String,
}

impl Line {
    fn of(entry: &ICalendarEntry) -> Line {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = entry.write_to(&mut text);
        Line::parse(&unfold(&text))
    }

    fn parse(text: &str) -> Line {
        let mut parts = Vec::new();
        let mut current = String::new();
        let mut quoted = false;
        let mut value = String::new();
        for (i, c) in text.char_indices() {
            match c {
                '"' => quoted = !quoted,
                ';' if !quoted => parts.push(std::mem::take(&mut current)),
                ':' if !quoted => {
                    parts.push(std::mem::take(&mut current));
                    value = text[i + 1..].to_owned();
                    break;
                }
                _ => current.push(c),
            }
        }
        let mut parts = parts.into_iter();
        let name = parts.next().unwrap_or_default().to_ascii_uppercase();
        let params = parts
            .map(|p| match p.split_once('=') {
                Some((n, v)) => (n.to_ascii_uppercase(), v.to_owned()),
                None => (p.to_ascii_uppercase(), String::new()),
            })
            .collect();
        Line {
            name,
            params,
            value,
        }
    }

    fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The parameters not in `known`, as `NAME=value;...` (values quoted as needed).
    fn other_params(&self, known: &[&str]) -> Option<String> {
        let text = self
            .params
            .iter()
            .filter(|(n, _)| !known.contains(&n.as_str()))
            .map(|(n, v)| format!("{n}={}", quote_param(v)))
            .collect::<Vec<_>>()
            .join(";");
        (!text.is_empty()).then_some(text)
    }
}

fn unfold(text: &str) -> String {
    text.replace("\r\n ", "")
        .replace("\r\n\t", "")
        .trim_end_matches(['\r', '\n'])
        .to_owned()
}

fn quote_param(value: &str) -> String {
    if value.contains([':', ';', ',']) {
        format!("\"{value}\"")
    } else {
        value.to_owned()
    }
}

fn escape_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            ';' => out.push_str("\\;"),
            ',' => out.push_str("\\,"),
            '\n' => out.push_str("\\n"),
            '\r' => {}
            _ => out.push(c),
        }
    }
    out
}

fn parse_calendar(text: &str) -> Result<ICalendar, EventError> {
    match Parser::new(text).entry() {
        Entry::ICalendar(calendar) => Ok(calendar),
        Entry::InvalidLine(line) => Err(err(format!("not iCalendar: invalid line `{line}`"))),
        Entry::Eof => Err(err("not iCalendar: empty")),
        other => Err(err(format!("not iCalendar: {other:?}"))),
    }
}

/// A component written out with its entries (and those of its components) in a
/// normal order, so that a server's reordering reads back the same.
fn component_text(calendar: &ICalendar, component: &ICalendarComponent) -> String {
    let mut lines: Vec<String> = component
        .entries
        .iter()
        .map(|entry| {
            let mut text = String::new();
            let _ = entry.write_to(&mut text);
            text
        })
        .collect();
    lines.sort();
    let name = component.component_type.as_str();
    format!(
        "BEGIN:{name}\r\n{}{}END:{name}\r\n",
        lines.concat(),
        children_text(calendar, component).concat()
    )
}

/// The components inside `component`, each written out in normal order, sorted.
fn children_text(calendar: &ICalendar, component: &ICalendarComponent) -> Vec<String> {
    let mut children: Vec<String> = component
        .component_ids
        .iter()
        .filter_map(|id| calendar.components.get(*id as usize))
        .map(|child| component_text(calendar, child))
        .collect();
    children.sort();
    children
}

/// Why a resource is not read as an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// The resource holds no event (a task, a journal entry): not synced.
    NotAnEvent,
    /// The resource is not a valid event.
    Invalid(EventError),
}

impl From<EventError> for ReadError {
    fn from(e: EventError) -> ReadError {
        ReadError::Invalid(e)
    }
}

/// The `SEQUENCE` of a resource's main event (0 if none).
pub fn sequence(text: &str) -> i64 {
    text.lines()
        .filter_map(|line| line.trim_end().strip_prefix("SEQUENCE:"))
        .filter_map(|n| n.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

/// Reads a calendar resource as one event record, keyed by its `UID`.
pub fn read(text: &str) -> Result<(String, Record), ReadError> {
    let calendar = parse_calendar(text)?;
    if !calendar
        .components
        .iter()
        .any(|c| c.component_type == ICalendarComponentType::VEvent)
    {
        return Err(ReadError::NotAnEvent);
    }
    let zones = Resolver {
        own: Some(calendar.build_owned_tz_resolver()),
    };
    let mut uid = None;
    let mut master = None;
    let mut overrides = BTreeMap::new();
    for component in &calendar.components {
        if component.component_type != ICalendarComponentType::VEvent {
            continue;
        }
        let (this_uid, rid, record) = read_component(&calendar, component, &zones)?;
        match (&uid, this_uid) {
            (None, Some(u)) => uid = Some(u),
            (Some(u), Some(other)) if *u != other => {
                return Err(err(format!(
                    "the resource holds two events, `{u}` and `{other}`"
                ))
                .into());
            }
            _ => {}
        }
        match rid {
            Some(rid) => {
                overrides.insert(rid, Value::Map(record));
            }
            None => master = Some(record),
        }
    }
    let uid = uid.ok_or_else(|| err("no VEVENT with a UID"))?;
    let mut record = master.unwrap_or_default();
    for field in EVENT_FIELDS {
        record
            .entry(field.to_owned())
            .or_insert_with(|| empty(field));
    }
    record.insert("uid".to_owned(), Value::Text(uid.clone()));
    record.insert("overrides".to_owned(), Value::Map(overrides));
    Ok((uid, record))
}

fn empty(field: &str) -> Value {
    if MAP_FIELDS.contains(&field) && field != "organizer" {
        Value::Map(BTreeMap::new())
    } else {
        Value::Null
    }
}

type Component = (Option<String>, Option<String>, Record);

fn read_component(
    calendar: &ICalendar,
    component: &ICalendarComponent,
    zones: &Resolver,
) -> Result<Component, EventError> {
    let mut record = Record::new();
    let mut uid = None;
    let mut rid = None;
    let mut start = None;
    let mut end = None;
    let mut duration = None;
    let mut exdates = BTreeMap::new();
    let mut rdates = BTreeMap::new();
    let mut attendees = BTreeMap::new();
    let mut params = BTreeMap::new();
    let mut extra: Vec<String> = Vec::new();
    for entry in &component.entries {
        let line = Line::of(entry);
        let keep = |params: &mut BTreeMap<String, Value>, known: &[&str]| {
            if let Some(other) = line.other_params(known) {
                params.insert(line.name.to_ascii_lowercase(), Value::Text(other));
            }
        };
        match line.name.as_str() {
            "UID" => uid = Some(text_value(entry).unwrap_or(line.value.clone())),
            "SUMMARY" | "DESCRIPTION" | "LOCATION" => {
                let text = text_value(entry).unwrap_or(line.value.clone());
                record.insert(line.name.to_ascii_lowercase(), Value::Text(text));
                keep(&mut params, &[]);
            }
            "STATUS" => {
                record.insert(
                    "status".to_owned(),
                    Value::Text(line.value.to_ascii_uppercase()),
                );
                keep(&mut params, &[]);
            }
            "DTSTART" | "DTEND" | "RECURRENCE-ID" => {
                let when = parse_when(&line.value, line.param("TZID"), zones)?;
                match line.name.as_str() {
                    "DTSTART" => start = Some(when),
                    "DTEND" => end = Some(when),
                    _ => rid = Some(when.key()),
                }
                keep(&mut params, &["TZID", "VALUE"]);
            }
            "DURATION" => duration = Some(parse_duration(&line.value)?),
            "RRULE" => {
                record.insert("rrule".to_owned(), Value::Text(line.value.clone()));
            }
            "EXDATE" | "RDATE" if line.param("VALUE") != Some("PERIOD") => {
                let set = if line.name == "EXDATE" {
                    &mut exdates
                } else {
                    &mut rdates
                };
                for value in line.value.split(',') {
                    set.insert(
                        parse_when(value, line.param("TZID"), zones)?.key(),
                        Value::Bool(true),
                    );
                }
            }
            "ATTENDEE" => {
                attendees.insert(
                    line.value.to_ascii_lowercase(),
                    Value::Map(address_params(&line)),
                );
            }
            "ORGANIZER" => {
                let mut organizer = address_params(&line);
                organizer.insert("address".to_owned(), Value::Text(line.value.clone()));
                record.insert("organizer".to_owned(), Value::Map(organizer));
            }
            name if DERIVED.contains(&name) => {}
            _ => {
                let mut text = String::new();
                let _ = entry.write_to(&mut text);
                extra.push(text);
            }
        }
    }
    extra.sort();
    extra.extend(children_text(calendar, component));
    if let Some(start) = start {
        let (time, zone) = start.values();
        record.insert("start".to_owned(), time);
        record.insert("start_zone".to_owned(), zone);
        if end.is_none() {
            end = duration.map(|d| start.plus(d));
        }
    }
    if let Some(end) = end {
        let (time, zone) = end.values();
        record.insert("end".to_owned(), time);
        record.insert("end_zone".to_owned(), zone);
    }
    let fields: &[&str] = if rid.is_some() {
        &OVERRIDE_FIELDS
    } else {
        record.insert("exdates".to_owned(), Value::Map(exdates));
        record.insert("rdates".to_owned(), Value::Map(rdates));
        &EVENT_FIELDS
    };
    record.insert("attendees".to_owned(), Value::Map(attendees));
    record.insert("params".to_owned(), Value::Map(params));
    if !extra.is_empty() {
        record.insert("extra".to_owned(), Value::Text(extra.concat()));
    }
    for field in fields {
        if *field != "overrides" && *field != "uid" {
            record
                .entry((*field).to_owned())
                .or_insert_with(|| empty(field));
        }
    }
    Ok((uid, rid, record))
}

fn text_value(entry: &ICalendarEntry) -> Option<String> {
    match entry.values.first() {
        Some(ICalendarValue::Text(text)) => Some(text.clone()),
        _ => None,
    }
}

/// An attendee's or organizer's parameters, names lower case, scheduling left out.
fn address_params(line: &Line) -> BTreeMap<String, Value> {
    line.params
        .iter()
        .map(|(n, v)| (n.to_ascii_lowercase(), v))
        .filter(|(n, _)| !SCHEDULING_PARAMS.contains(&n.as_str()))
        .map(|(n, v)| (n, Value::Text(v.clone())))
        .collect()
}

fn parse_duration(text: &str) -> Result<Duration, EventError> {
    let bad = || err(format!("`{text}` is not a duration"));
    let (negative, rest) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let rest = rest.strip_prefix('P').ok_or_else(bad)?;
    let mut seconds = 0i64;
    let mut number = String::new();
    let mut in_time = false;
    for c in rest.chars() {
        match c {
            '0'..='9' => number.push(c),
            'T' => in_time = true,
            unit => {
                let n: i64 = number.parse().map_err(|_| bad())?;
                number.clear();
                seconds += n * match (unit, in_time) {
                    ('W', false) => 7 * 86_400,
                    ('D', false) => 86_400,
                    ('H', true) => 3_600,
                    ('M', true) => 60,
                    ('S', true) => 1,
                    _ => return Err(bad()),
                };
            }
        }
    }
    Ok(Duration::seconds(if negative { -seconds } else { seconds }))
}

/// Writes `record` as a calendar resource, with `sequence` as its `SEQUENCE` and
/// `now` as its `DTSTAMP`. An occurrence both cancelled (`exdates`) and overridden is
/// written cancelled.
pub fn write(record: &Record, sequence: i64, now: DateTime<Utc>) -> Result<String, EventError> {
    let uid = match record.get("uid") {
        Some(Value::Text(uid)) if !uid.is_empty() => uid.clone(),
        _ => return Err(err("an event needs a `uid`")),
    };
    let stamp = now.format("%Y%m%dT%H%M%SZ").to_string();
    let mut text =
        String::from("BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//Concord//Concord//EN\r\n");
    let head = |text: &mut String| {
        let _ = write!(
            text,
            "BEGIN:VEVENT\r\nUID:{}\r\nDTSTAMP:{stamp}\r\nSEQUENCE:{sequence}\r\n",
            escape_text(&uid)
        );
    };
    head(&mut text);
    let start = write_fields(&mut text, record, None)?;
    if let Some(Value::Text(rule)) = record.get("rrule") {
        let _ = write!(text, "RRULE:{rule}\r\n");
    }
    let exdates = keys(record.get("exdates"));
    for (property, set) in [("EXDATE", &exdates), ("RDATE", &keys(record.get("rdates")))] {
        for key in set {
            let (params, value) = When::from_key(key, start)?.ical();
            let _ = write!(text, "{property}{params}:{value}\r\n");
        }
    }
    text.push_str("END:VEVENT\r\n");
    if let Some(Value::Map(overrides)) = record.get("overrides") {
        for (rid, occurrence) in overrides {
            let Value::Map(occurrence) = occurrence else {
                continue;
            };
            if exdates.contains(rid) {
                continue;
            }
            head(&mut text);
            let (params, value) = When::from_key(rid, start)?.ical();
            let _ = write!(text, "RECURRENCE-ID{params}:{value}\r\n");
            write_fields(&mut text, occurrence, start)?;
            text.push_str("END:VEVENT\r\n");
        }
    }
    text.push_str("END:VCALENDAR\r\n");
    let mut calendar = parse_calendar(&text)?;
    calendar.add_missing_timezones();
    Ok(calendar.to_string())
}

fn keys(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::Map(set)) => set
            .iter()
            .filter(|(_, v)| **v != Value::Null && **v != Value::Bool(false))
            .map(|(k, _)| k.clone())
            .collect(),
        _ => Vec::new(),
    }
}

/// Writes the fields an event and an overridden occurrence share; returns the start.
/// An occurrence without a start of its own takes the series' (`series_start`).
fn write_fields(
    text: &mut String,
    record: &Record,
    series_start: Option<When>,
) -> Result<Option<When>, EventError> {
    let params = match record.get("params") {
        Some(Value::Map(params)) => params.clone(),
        _ => BTreeMap::new(),
    };
    let extra_params = |property: &str| match params.get(property) {
        Some(Value::Text(p)) if !p.is_empty() => format!(";{p}"),
        _ => String::new(),
    };
    let field = |name: &str| record.get(name).unwrap_or(&Value::Null);
    let start = When::of(field("start"), field("start_zone"))?;
    let end = When::of(field("end"), field("end_zone"))?;
    for (property, when) in [("DTSTART", start), ("DTEND", end)] {
        if let Some(when) = when {
            let (p, value) = when.ical();
            let extra = extra_params(&property.to_ascii_lowercase());
            let _ = write!(text, "{property}{p}{extra}:{value}\r\n");
        }
    }
    for name in ["summary", "description", "location", "status"] {
        match field(name) {
            Value::Null => {}
            Value::Text(value) => {
                let property = name.to_ascii_uppercase();
                let extra = extra_params(name);
                let value = if name == "status" {
                    value.to_ascii_uppercase()
                } else {
                    escape_text(value)
                };
                let _ = write!(text, "{property}{extra}:{value}\r\n");
            }
            other => {
                return Err(err(format!("`{name}` is text, not {}", other.type_name())));
            }
        }
    }
    if let Value::Map(attendees) = field("attendees") {
        for (address, params) in attendees {
            write_address(text, "ATTENDEE", address, params);
        }
    }
    if let Value::Map(organizer) = field("organizer")
        && let Some(Value::Text(address)) = organizer.get("address")
    {
        let mut params = organizer.clone();
        params.remove("address");
        write_address(text, "ORGANIZER", address, &Value::Map(params));
    }
    if let Value::Text(extra) = field("extra") {
        text.push_str(extra);
        if !extra.ends_with('\n') {
            text.push_str("\r\n");
        }
    }
    Ok(start.or(series_start))
}

fn write_address(text: &mut String, property: &str, address: &str, params: &Value) {
    text.push_str(property);
    if let Value::Map(params) = params {
        for (name, value) in params {
            if SCHEDULING_PARAMS.contains(&name.as_str()) {
                continue;
            }
            let value = match value {
                Value::Text(v) => v.clone(),
                Value::Null => continue,
                other => other.to_string(),
            };
            let _ = write!(
                text,
                ";{}={}",
                name.to_ascii_uppercase(),
                quote_param(&value)
            );
        }
    }
    let _ = write!(text, ";SCHEDULE-AGENT=CLIENT:{address}\r\n");
}

#[cfg(test)]
mod tests;
