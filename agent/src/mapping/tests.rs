use std::collections::BTreeMap;
use std::path::Path;

use connectors::FieldType;
use crdt_model::{Decimal, Record, RecordState, Timestamp, Value};

use super::{Mapping, MappingError, Projection, collection_mapping, natural_key};
use crate::config::{Config, ConfigError};

const HEAD: &str = r#"
data_dir = "data"
key_file = "k.pem"
listen = "127.0.0.1:7400"

[[collection]]
name = "customers"
natural_key = ["email"]

[[tool]]
name = "crm"
kind = "sqlite"
path = "a.db"

[[tool.collection]]
name = "customers"
table = "customers"
primary_key = "id"
"#;

/// The mapping of `extra` appended to a one-collection configuration.
fn mapping_of(
    extra: &str,
    types: Option<&BTreeMap<String, FieldType>>,
) -> Result<Mapping, ConfigError> {
    let config = Config::parse(Path::new("agent.toml"), format!("{HEAD}{extra}"))?;
    collection_mapping(&config, 0, 0, types)
}

fn text(s: &str) -> Value {
    Value::Text(s.to_owned())
}

fn dec(s: &str) -> Value {
    Value::Decimal(Decimal::parse(s).expect("a decimal"))
}

fn record(pairs: &[(&str, Value)]) -> Record {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

fn state(fields: Record) -> RecordState {
    RecordState {
        fields,
        ..RecordState::default()
    }
}

fn held(mapping: &Mapping, fields: Record) -> Record {
    match mapping.project(&state(fields)) {
        Ok(Projection::Held(record)) => record,
        other => panic!("expected a held record, got {other:?}"),
    }
}

const CUSTOMERS: &str = r#"
filter = 'status == "active"'
changed_at = "updated_at"

[[tool.collection.field]]
column = "full_name"
field = "name"

[[tool.collection.field]]
column = "amount_cents"
field = "amount"
convert = "minor_units"

[[tool.collection.field]]
column = "updated_at"
field = "updated"
convert = "timestamp"
format = "%Y-%m-%d %H:%M:%S"
timezone = "Europe/Berlin"

[[tool.collection.field]]
column = "status"
values = { A = "active", I = "inactive" }
default = "unknown"

[[tool.collection.field]]
column = "vip"
convert = "bool"
true_value = "Y"
false_value = "N"

[[tool.collection.field]]
column = "notes"
max_length = 10

[[tool.collection.field]]
column = "label"
compute = 'name + " <" + email + ">"'

[[tool.collection.field]]
column = "email"
trim = true
"#;

#[test]
fn a_row_reads_into_canonical_fields_and_projects_back_exactly() -> Result<(), ConfigError> {
    let mapping = mapping_of(CUSTOMERS, None)?;
    let row = record(&[
        ("full_name", text("Ada Lovelace")),
        ("amount_cents", Value::Int(123_456)),
        ("updated_at", text("2026-03-29 03:30:00")),
        ("status", text("A")),
        ("vip", text("Y")),
        ("notes", text("short")),
        ("email", text(" ada@example.com ")),
    ]);
    let fields = mapping.read(&row, None).expect("the row converts");
    assert_eq!(fields["name"], text("Ada Lovelace"));
    assert_eq!(fields["amount"], dec("1234.56"));
    // 03:30 in Berlin on the day summer time starts is 01:30 UTC.
    let expected = chrono::DateTime::parse_from_rfc3339("2026-03-29T01:30:00Z")
        .expect("a time")
        .timestamp_micros();
    assert_eq!(
        fields["updated"],
        Value::Timestamp(Timestamp::from_micros(expected))
    );
    assert_eq!(fields["status"], text("active"));
    assert_eq!(fields["vip"], Value::Bool(true));
    assert_eq!(fields["email"], text("ada@example.com"));
    assert!(
        !fields.contains_key("label"),
        "a computed column is never read"
    );
    assert_eq!(mapping.changed_at_ms(&row), Some(expected / 1000));

    let back = held(&mapping, fields.clone());
    assert_eq!(back["full_name"], row["full_name"]);
    assert_eq!(back["amount_cents"], row["amount_cents"]);
    assert_eq!(back["updated_at"], row["updated_at"]);
    assert_eq!(back["status"], row["status"]);
    assert_eq!(back["vip"], row["vip"]);
    assert_eq!(back["label"], text("Ada Lovelace <ada@example.com>"));
    // The tool holds what it was given: nothing to write but the computed column.
    let writes = mapping.writes(&back, &fields, Some(&row));
    assert_eq!(writes.keys().collect::<Vec<_>>(), ["label"], "{writes:?}");
    Ok(())
}

#[test]
fn a_text_cut_to_the_column_length_stays_whole_in_the_document() -> Result<(), ConfigError> {
    let mapping = mapping_of(CUSTOMERS, None)?;
    let long = "a note much longer than ten characters";
    let fields = record(&[
        ("status", text("active")),
        ("notes", text(long)),
        ("name", text("Ada")),
        ("email", text("ada@example.com")),
    ]);
    let target = held(&mapping, fields.clone());
    assert_eq!(target["notes"], text("a note muc"));
    // The tool holds the cut text: in sync, nothing to write.
    let tool = target.clone();
    assert!(mapping.writes(&target, &fields, Some(&tool)).is_empty());
    // Another field edited in the tool does not send the cut text back.
    let mut edited = tool.clone();
    edited.insert("full_name".to_owned(), text("Ada L."));
    let read = mapping.read(&edited, Some(&tool)).expect("reads");
    assert_eq!(read, record(&[("name", text("Ada L."))]));
    Ok(())
}

#[test]
fn an_unknown_enumeration_value_reads_as_the_default_and_is_not_written_over()
-> Result<(), ConfigError> {
    let mapping = mapping_of(CUSTOMERS, None)?;
    let row = record(&[("status", text("X"))]);
    let fields = mapping.read(&row, None).expect("reads");
    assert_eq!(fields["status"], text("unknown"));
    // The document says "unknown", which the tool's "X" reads as: in sync.
    let target = record(&[("status", text("unknown"))]);
    assert!(mapping.writes(&target, &fields, Some(&row)).is_empty());
    Ok(())
}

#[test]
fn the_filter_decides_what_the_tool_holds() -> Result<(), ConfigError> {
    let mapping = mapping_of(CUSTOMERS, None)?;
    let inactive = state(record(&[("status", text("inactive"))]));
    assert_eq!(mapping.project(&inactive), Ok(Projection::Outside));
    let no_status = state(Record::new());
    assert_eq!(mapping.project(&no_status), Ok(Projection::Outside));
    let deleted = RecordState {
        deleted: true,
        ..state(record(&[("status", text("active"))]))
    };
    assert_eq!(mapping.project(&deleted), Ok(Projection::Deleted));
    Ok(())
}

#[test]
fn values_that_do_not_convert_are_errors_naming_column_and_field() -> Result<(), ConfigError> {
    let mapping = mapping_of(CUSTOMERS, None)?;
    let err = mapping
        .read(&record(&[("updated_at", text("yesterday"))]), None)
        .expect_err("not a time");
    assert!(
        matches!(&err, MappingError::Read { column, field, .. } if column == "updated_at" && field == "updated"),
        "{err}"
    );
    // Fractions of a cent do not fit an integer count of cents: never rounded.
    let fields = record(&[("status", text("active")), ("amount", dec("1.005"))]);
    let err = mapping
        .project(&state(fields))
        .expect_err("not whole cents");
    assert!(err.to_string().contains("amount_cents"), "{err}");
    // A computed column over a missing field fails on that record only.
    let fields = record(&[("status", text("active")), ("name", text("Ada"))]);
    let err = mapping.project(&state(fields)).expect_err("no email");
    assert!(matches!(err, MappingError::Compute { .. }), "{err}");
    Ok(())
}

#[test]
fn directions_keep_fields_one_way() -> Result<(), ConfigError> {
    let mapping = mapping_of(
        r#"
[[tool.collection.field]]
column = "credit"
direction = "out_of_tool"

[[tool.collection.field]]
column = "tier"
direction = "into_tool"
"#,
        None,
    )?;
    let row = record(&[("credit", Value::Int(5)), ("tier", text("gold"))]);
    assert_eq!(
        mapping.read(&row, None),
        Ok(record(&[("credit", Value::Int(5))]))
    );
    let target = held(
        &mapping,
        record(&[("credit", Value::Int(9)), ("tier", text("gold"))]),
    );
    assert_eq!(target, record(&[("tier", text("gold"))]));
    Ok(())
}

#[test]
fn units_text_numbers_and_wall_clock_times_round_trip() -> Result<(), ConfigError> {
    let types = BTreeMap::from([
        ("grams".to_owned(), FieldType::Integer),
        ("price".to_owned(), FieldType::Text),
        ("code".to_owned(), FieldType::Integer),
        ("seen".to_owned(), FieldType::Timestamp),
        ("active".to_owned(), FieldType::Integer),
    ]);
    let mapping = mapping_of(
        r#"
[[tool.collection.field]]
column = "grams"
field = "kilograms"
factor = 1000

[[tool.collection.field]]
column = "price"
convert = "number"

[[tool.collection.field]]
column = "code"
convert = "text"

[[tool.collection.field]]
column = "seen"
timezone = "America/New_York"

[[tool.collection.field]]
column = "active"
convert = "bool"
"#,
        Some(&types),
    )?;
    let row = record(&[
        ("grams", Value::Int(1500)),
        ("price", text("19.90")),
        ("code", Value::Int(42)),
        ("seen", Value::Timestamp(Timestamp::from_micros(0))),
        ("active", Value::Int(0)),
    ]);
    let fields = mapping.read(&row, None).expect("reads");
    assert_eq!(fields["kilograms"], dec("1.5"));
    assert_eq!(fields["price"], dec("19.9"));
    assert_eq!(fields["code"], text("42"));
    // Midnight on New York's wall clock is 05:00 UTC.
    assert_eq!(
        fields["seen"],
        Value::Timestamp(Timestamp::from_micros(5 * 3_600_000_000))
    );
    assert_eq!(fields["active"], Value::Bool(false));
    let back = held(&mapping, fields.clone());
    assert_eq!(back["grams"], row["grams"]);
    assert_eq!(back["code"], row["code"]);
    assert_eq!(back["seen"], row["seen"]);
    assert_eq!(back["active"], row["active"]);
    // "19.90" comes back as "19.9": the same number, so the tool is not rewritten.
    assert_eq!(back["price"], text("19.9"));
    assert!(mapping.writes(&back, &fields, Some(&row)).is_empty());
    Ok(())
}

#[test]
fn mapping_errors_name_file_line_tool_collection_and_expression() {
    let err = |extra: &str, types: Option<&BTreeMap<String, FieldType>>| {
        mapping_of(extra, types).expect_err("refused").to_string()
    };
    let e = err("filter = 'status == '\ncolumns = [\"status\"]\n", None);
    assert!(
        e.starts_with("agent.toml:19: `tool[0].collection[0].filter`"),
        "{e}"
    );
    assert!(e.contains("1:11: Syntax error"), "{e}");
    assert!(e.contains("tool `crm`, collection `customers`"), "{e}");
    assert!(e.contains("status == "), "{e}");
    let e = err(
        "[[tool.collection.field]]\ncolumn = \"a\"\ncompute = 'x +'\n",
        None,
    );
    assert!(
        e.starts_with("agent.toml:21: `tool[0].collection[0].field[0].compute`"),
        "{e}"
    );
    let types = BTreeMap::from([("amount".to_owned(), FieldType::Text)]);
    let e = err(
        "[[tool.collection.field]]\ncolumn = \"amount\"\nconvert = \"minor_units\"\n",
        Some(&types),
    );
    assert!(
        e.contains("column `amount` is text, and this needs an integer column"),
        "{e}"
    );
    let e = err(
        "[[tool.collection.field]]\ncolumn = \"nope\"\n",
        Some(&types),
    );
    assert!(e.contains("no column `nope`"), "{e}");
    let e = err(
        "[[tool.collection.field]]\ncolumn = \"a\"\nfield = \"x\"\n\n[[tool.collection.field]]\ncolumn = \"b\"\nfield = \"x\"\n",
        None,
    );
    assert!(e.contains("read from two columns"), "{e}");
    let e = err(
        "[[tool.collection.field]]\ncolumn = \"a\"\ntimezone = \"Mars/Base\"\n",
        None,
    );
    assert!(e.contains("not an IANA time zone"), "{e}");
    let e = err(
        "[[tool.collection.field]]\ncolumn = \"a\"\nformat = \"%Y\"\n",
        None,
    );
    assert!(
        e.contains("`format` applies to `convert = \"timestamp\"`"),
        "{e}"
    );
    let e = err(
        "[[tool.collection.field]]\ncolumn = \"a\"\nvalues = { x = \"same\", y = \"same\" }\n",
        None,
    );
    assert!(e.contains("both map to `same`"), "{e}");
}

#[test]
fn natural_keys_normalise_their_fields() -> Result<(), ConfigError> {
    let config = Config::parse(
        Path::new("agent.toml"),
        HEAD.replace(
            "natural_key = [\"email\"]",
            "natural_key = [\"email\", \"phone\"]\nnormalize = { phone = [\"digits\"] }",
        ) + "columns = [\"email\", \"phone\"]\n",
    )?;
    let key = natural_key(&config, "customers")?.expect("a natural key");
    let a = record(&[
        ("email", text(" Ada@Example.COM ")),
        ("phone", text("+44 (20) 7946-0000")),
    ]);
    let b = record(&[
        ("email", text("ada@example.com")),
        ("phone", text("442079460000")),
    ]);
    assert_eq!(key.of(&a), key.of(&b));
    assert!(key.of(&a).is_some());
    let no_phone = record(&[("email", text("ada@example.com")), ("phone", Value::Null)]);
    assert_eq!(
        key.of(&no_phone),
        None,
        "a record without a key value is never matched"
    );
    Ok(())
}

#[test]
fn plain_columns_are_a_copy() {
    let mapping = Mapping::plain(&["a".to_owned(), "b".to_owned()]);
    let row = record(&[("a", Value::Int(1)), ("b", Value::Null)]);
    assert_eq!(
        mapping.read(&row, None),
        Ok(record(&[("a", Value::Int(1))]))
    );
    let shadow = record(&[("a", Value::Int(1)), ("b", text("x"))]);
    assert_eq!(
        mapping.read(&row, Some(&shadow)),
        Ok(record(&[("b", Value::Null)]))
    );
    assert_eq!(held(&mapping, record(&[("a", Value::Int(1))])), row);
}
