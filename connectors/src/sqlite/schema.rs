//! Table introspection and the capture machinery installed in the database: field
//! types from declared column types, validation of collection specs, the outbox and
//! echo-flag tables, and the capture triggers.

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension};

use super::{CollectionSpec, SqliteError};
use crate::FieldType;
pub(super) use crate::values::{quote_ident, quote_literal};

/// Prefix of every table and trigger Concord creates; user tables may not use it.
pub(super) const RESERVED_PREFIX: &str = "_concord_";

/// Creates the outbox and the echo flag if missing and clears the flag.
///
/// The flag is cleared because a crash cannot leave it set (write-back sets and clears
/// it inside one transaction), but a hand-edited database might.
pub(super) const BOOKKEEPING_SQL: &str = "
CREATE TABLE IF NOT EXISTS _concord_outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    tbl TEXT NOT NULL,
    key TEXT NOT NULL,
    old_key TEXT
);
CREATE TABLE IF NOT EXISTS _concord_echo (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    active INTEGER NOT NULL
);
INSERT OR IGNORE INTO _concord_echo (id, active) VALUES (1, 0);
UPDATE _concord_echo SET active = 0 WHERE id = 1 AND active <> 0;
CREATE TABLE IF NOT EXISTS _concord_inserted (
    token TEXT PRIMARY KEY,
    tbl TEXT NOT NULL,
    key TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS _concord_owner (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    store BLOB NOT NULL,
    rescan_upto INTEGER NOT NULL
);
";

/// Adds the outbox's `old_key` column to an outbox made before it existed.
pub(super) fn add_old_key_column(conn: &Connection) -> rusqlite::Result<()> {
    let has: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM pragma_table_info('_concord_outbox') WHERE name = 'old_key')",
        [],
        |row| row.get(0),
    )?;
    if !has {
        conn.execute_batch("ALTER TABLE _concord_outbox ADD COLUMN old_key TEXT")?;
    }
    Ok(())
}

/// The condition under which a trigger records a change: no write-back is running.
///
/// A missing flag row counts as "not active", so a damaged flag table never silences
/// capture.
const NOT_ECHO_SQL: &str = "COALESCE((SELECT active FROM _concord_echo WHERE id = 1), 0) = 0";

/// The field type for a declared SQLite column type, or `None` when Concord cannot
/// sync such a column (for example `BLOB`).
///
/// The rules look for substrings, case-insensitively and in this order, the way
/// SQLite derives column affinity: `BOOL`; `INT`; `DEC`, `NUMERIC` or `MONEY`;
/// `REAL`, `FLOA` or `DOUB`; `DATE` or `TIMESTAMP`; `JSON`; `TEXT`, `CHAR`, `CLOB`
/// or an empty type.
pub(super) fn field_type_of(declared: &str) -> Option<FieldType> {
    let upper = declared.to_ascii_uppercase();
    let has = |needles: &[&str]| needles.iter().any(|needle| upper.contains(needle));
    if has(&["BOOL"]) {
        Some(FieldType::Bool)
    } else if has(&["INT"]) {
        Some(FieldType::Integer)
    } else if has(&["DEC", "NUMERIC", "MONEY"]) {
        Some(FieldType::Decimal)
    } else if has(&["REAL", "FLOA", "DOUB"]) {
        Some(FieldType::Float)
    } else if has(&["TIMESTAMP", "DATE"]) {
        Some(FieldType::Timestamp)
    } else if has(&["JSON"]) {
        Some(FieldType::Json)
    } else if has(&["TEXT", "CHAR", "CLOB"]) || upper.trim().is_empty() {
        Some(FieldType::Text)
    } else {
        None
    }
}

/// One column Concord reads and writes.
#[derive(Debug, Clone)]
pub(super) struct Column {
    /// The record field name: the column name as configured.
    pub(super) field: String,
    /// The column name, quoted for SQL.
    pub(super) sql_name: String,
    /// The declared SQL type, verbatim.
    pub(super) declared: String,
    /// The field type derived from `declared`.
    pub(super) field_type: FieldType,
    /// True when SQLite stores text in this column verbatim (TEXT or BLOB affinity);
    /// false when it turns numeric-looking text into numbers.
    pub(super) keeps_text: bool,
    /// How a timestamp column's values are written: learned from the values it
    /// holds, at first from its declared type (`DATE` alone: `YYYY-MM-DD`; otherwise
    /// SQLite's `YYYY-MM-DD HH:MM:SS`).
    pub(super) timestamp_style: std::cell::Cell<super::convert::TimestampStyle>,
}

impl Column {
    fn new(
        table: &str,
        field: &str,
        actual_name: &str,
        declared: &str,
    ) -> Result<Column, SqliteError> {
        let field_type = field_type_of(declared).ok_or_else(|| SqliteError::UnsupportedType {
            table: table.to_owned(),
            column: actual_name.to_owned(),
            declared: declared.to_owned(),
        })?;
        let upper = declared.to_ascii_uppercase();
        Ok(Column {
            field: field.to_owned(),
            sql_name: quote_ident(actual_name),
            declared: declared.to_owned(),
            field_type,
            keeps_text: keeps_text(&upper),
            timestamp_style: std::cell::Cell::new(
                if upper.contains("DATE") && !upper.contains("TIME") {
                    super::convert::TimestampStyle::DateOnly
                } else {
                    super::convert::TimestampStyle::SQLITE
                },
            ),
        })
    }

    /// The declared type for messages: `declared INTEGER` or `declared without a type`.
    pub(super) fn declared_phrase(&self) -> String {
        if self.declared.trim().is_empty() {
            "declared without a type".to_owned()
        } else {
            format!("declared {}", self.declared)
        }
    }
}

/// True when SQLite's affinity for `upper` (an upper-cased declared type) is TEXT or
/// BLOB, the two affinities that never turn text into numbers.
fn keeps_text(upper: &str) -> bool {
    if upper.contains("INT") {
        return false;
    }
    ["CHAR", "CLOB", "TEXT", "BLOB"]
        .iter()
        .any(|needle| upper.contains(needle))
        || upper.trim().is_empty()
}

/// A validated collection: its table, key column, synced columns and the SQL to read
/// one row.
#[derive(Debug)]
pub(super) struct Table {
    /// The collection name from the spec.
    pub(super) collection: String,
    /// The table name as configured (what the triggers write into the outbox).
    pub(super) name: String,
    /// The table name, quoted for SQL.
    pub(super) sql_name: String,
    /// The primary key column.
    pub(super) key: Column,
    /// The configured columns, in configured order, without duplicates.
    pub(super) columns: Vec<Column>,
    /// Field type per configured column, for reports.
    pub(super) field_types: BTreeMap<String, FieldType>,
    /// `SELECT <columns> FROM <table> WHERE <key> = ?1`.
    pub(super) select_sql: String,
    /// `DELETE FROM <table> WHERE <key> = ?1`.
    pub(super) delete_sql: String,
    /// Inserts a row holding only its key unless the row exists.
    pub(super) insert_key_sql: String,
    /// Whether SQLite assigns the key of a row inserted without one: an `INTEGER
    /// PRIMARY KEY` of a rowid table.
    pub(super) assigns_keys: bool,
}

impl Table {
    /// Checks `spec` against the database schema and derives the column types.
    pub(super) fn validate(conn: &Connection, spec: &CollectionSpec) -> Result<Table, SqliteError> {
        let table = spec.table.as_str();
        check_table_kind(conn, table)?;
        // (name, declared type, position in the primary key or 0)
        let info: Vec<(String, String, i64)> = conn
            .prepare_cached("SELECT name, type, pk FROM pragma_table_info(?1)")?
            .query_map([table], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
            .collect::<Result<_, _>>()?;
        let key = key_column(table, spec, &info)?;
        let columns = configured_columns(table, spec, &info)?;
        let sql_name = quote_ident(table);
        let selected = if columns.is_empty() {
            "1".to_owned()
        } else {
            let names: Vec<&str> = columns.iter().map(|c| c.sql_name.as_str()).collect();
            names.join(", ")
        };
        let select_sql = format!(
            "SELECT {selected} FROM {sql_name} WHERE {key} = ?1",
            key = key.sql_name
        );
        let delete_sql = format!(
            "DELETE FROM {sql_name} WHERE {key} = ?1",
            key = key.sql_name
        );
        let insert_key_sql = format!(
            "INSERT INTO {sql_name} ({key}) SELECT ?1
             WHERE NOT EXISTS (SELECT 1 FROM {sql_name} WHERE {key} = ?1)",
            key = key.sql_name
        );
        let field_types = columns
            .iter()
            .map(|column| (column.field.clone(), column.field_type))
            .collect();
        let without_rowid: bool = conn
            .query_row(
                "SELECT COALESCE((SELECT wr FROM pragma_table_list WHERE name = ?1), 0)",
                [table],
                |row| row.get(0),
            )
            .optional()?
            .unwrap_or(false);
        let assigns_keys = key.declared.eq_ignore_ascii_case("INTEGER") && !without_rowid;
        Ok(Table {
            collection: spec.collection.clone(),
            name: table.to_owned(),
            sql_name,
            key,
            columns,
            field_types,
            select_sql,
            delete_sql,
            insert_key_sql,
            assigns_keys,
        })
    }

    /// The SQL that creates this table's three capture triggers.
    ///
    /// Each trigger appends `(table, key)` to the outbox unless a write-back is running.
    /// An update that changes the key appends one entry for the new key naming the
    /// old one (`old_key`), so the record can stay one record.
    /// A row whose key is NULL (SQLite allows that for keys that are not `INTEGER
    /// PRIMARY KEY` in rowid tables) cannot be identified and is not recorded; failing
    /// the user's write instead would break their tool.
    pub(super) fn triggers_sql(&self) -> String {
        let table = &self.sql_name;
        let literal = quote_literal(&self.name);
        let key = &self.key.sql_name;
        let trigger =
            |suffix: &str| quote_ident(&format!("{RESERVED_PREFIX}{}_{suffix}", self.name));
        format!(
            "CREATE TRIGGER {ins} AFTER INSERT ON {table}
             WHEN NEW.{key} IS NOT NULL AND {NOT_ECHO_SQL}
             BEGIN
                 INSERT INTO _concord_outbox (tbl, key) VALUES ({literal}, CAST(NEW.{key} AS TEXT));
             END;
             CREATE TRIGGER {upd} AFTER UPDATE ON {table}
             WHEN {NOT_ECHO_SQL}
             BEGIN
                 INSERT INTO _concord_outbox (tbl, key, old_key)
                     SELECT {literal}, CAST(NEW.{key} AS TEXT),
                         CASE WHEN OLD.{key} IS NOT NEW.{key} COLLATE BINARY
                             THEN CAST(OLD.{key} AS TEXT) END
                     WHERE NEW.{key} IS NOT NULL;
                 INSERT INTO _concord_outbox (tbl, key)
                     SELECT {literal}, CAST(OLD.{key} AS TEXT)
                     WHERE OLD.{key} IS NOT NULL AND NEW.{key} IS NULL;
             END;
             CREATE TRIGGER {del} AFTER DELETE ON {table}
             WHEN OLD.{key} IS NOT NULL AND {NOT_ECHO_SQL}
             BEGIN
                 INSERT INTO _concord_outbox (tbl, key) VALUES ({literal}, CAST(OLD.{key} AS TEXT));
             END;",
            ins = trigger("ins"),
            upd = trigger("upd"),
            del = trigger("del"),
        )
    }
}

impl Table {
    /// The name of this table's insert trigger: present once capture was installed.
    pub(super) fn insert_trigger_name(&self) -> String {
        format!("{RESERVED_PREFIX}{}_ins", self.name)
    }

    /// Queues every existing row of the table in the outbox: the initial import of a
    /// table whose capture is installed for the first time.
    pub(super) fn import_sql(&self) -> String {
        format!(
            "INSERT INTO _concord_outbox (tbl, key)
             SELECT {literal}, CAST({key} AS TEXT) FROM {table} WHERE {key} IS NOT NULL ORDER BY {key}",
            literal = quote_literal(&self.name),
            key = self.key.sql_name,
            table = self.sql_name,
        )
    }
}

/// Refuses a name of Concord's own, a missing table and a view.
fn check_table_kind(conn: &Connection, table: &str) -> Result<(), SqliteError> {
    if table
        .get(..RESERVED_PREFIX.len())
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case(RESERVED_PREFIX))
    {
        return Err(SqliteError::ReservedTable {
            table: table.to_owned(),
        });
    }
    let kind: Option<String> = conn
        .prepare_cached(
            "SELECT type FROM sqlite_schema
             WHERE type IN ('table', 'view') AND name = ?1 COLLATE NOCASE",
        )?
        .query_row([table], |row| row.get(0))
        .optional()?;
    match kind.as_deref() {
        None => Err(SqliteError::MissingTable {
            table: table.to_owned(),
        }),
        Some("view") => Err(SqliteError::NotATable {
            table: table.to_owned(),
        }),
        Some(_) => Ok(()),
    }
}

/// The table's single-column PRIMARY KEY, which must be the one configured.
fn key_column(
    table: &str,
    spec: &CollectionSpec,
    info: &[(String, String, i64)],
) -> Result<Column, SqliteError> {
    let mut key_columns: Vec<&(String, String, i64)> =
        info.iter().filter(|(_, _, pk)| *pk > 0).collect();
    key_columns.sort_by_key(|(_, _, pk)| *pk);
    let (key_name, key_declared) = match key_columns.as_slice() {
        [] => {
            return Err(SqliteError::NoPrimaryKey {
                table: table.to_owned(),
            });
        }
        [(name, declared, _)] => (name, declared),
        several => {
            let names: Vec<&str> = several.iter().map(|(name, _, _)| name.as_str()).collect();
            return Err(SqliteError::CompositePrimaryKey {
                table: table.to_owned(),
                columns: names.join(", "),
            });
        }
    };
    if !key_name.eq_ignore_ascii_case(&spec.primary_key) {
        return Err(SqliteError::PrimaryKeyMismatch {
            table: table.to_owned(),
            configured: spec.primary_key.clone(),
            actual: key_name.clone(),
        });
    }
    Column::new(table, &spec.primary_key, key_name, key_declared)
}

/// The configured columns, in configured order, without duplicates.
fn configured_columns(
    table: &str,
    spec: &CollectionSpec,
    info: &[(String, String, i64)],
) -> Result<Vec<Column>, SqliteError> {
    let mut columns: Vec<Column> = Vec::with_capacity(spec.columns.len());
    for configured in &spec.columns {
        if columns
            .iter()
            .any(|column| column.field.eq_ignore_ascii_case(configured))
        {
            continue;
        }
        let (actual, declared, _) = info
            .iter()
            .find(|(name, _, _)| name.eq_ignore_ascii_case(configured))
            .ok_or_else(|| SqliteError::MissingColumn {
                table: table.to_owned(),
                column: configured.clone(),
            })?;
        columns.push(Column::new(table, configured, actual, declared)?);
    }
    for column in &columns {
        if column.field_type == FieldType::Decimal && !column.keeps_text {
            tracing::info!(
                table,
                column = column.field,
                declared = column.declared,
                "column has NUMERIC affinity: SQLite keeps about 15 significant digits of \
                 a decimal, so write-back rejects longer decimals; declare the column \
                 DECIMAL_TEXT to keep decimals exact"
            );
        }
    }
    Ok(columns)
}

/// The names of the triggers Concord installed earlier.
pub(super) fn trigger_names(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    conn.prepare(
        "SELECT name FROM sqlite_schema
         WHERE type = 'trigger' AND name LIKE '\\_concord\\_%' ESCAPE '\\'",
    )?
    .query_map([], |row| row.get(0))?
    .collect()
}

/// Drops every trigger Concord installed earlier, so that re-opening with a changed
/// configuration or schema leaves exactly the current triggers.
pub(super) fn drop_triggers(conn: &Connection) -> rusqlite::Result<()> {
    let names = trigger_names(conn)?;
    for name in names {
        conn.execute_batch(&format!("DROP TRIGGER IF EXISTS {}", quote_ident(&name)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_types_follow_declared_types() {
        let cases = [
            ("BOOLEAN", Some(FieldType::Bool)),
            ("INTEGER", Some(FieldType::Integer)),
            ("bigint", Some(FieldType::Integer)),
            ("DECIMAL(12,2)", Some(FieldType::Decimal)),
            ("NUMERIC", Some(FieldType::Decimal)),
            ("MONEY", Some(FieldType::Decimal)),
            ("REAL", Some(FieldType::Float)),
            ("DOUBLE PRECISION", Some(FieldType::Float)),
            ("float", Some(FieldType::Float)),
            ("TIMESTAMP", Some(FieldType::Timestamp)),
            ("DATETIME", Some(FieldType::Timestamp)),
            ("DATE", Some(FieldType::Timestamp)),
            ("JSON", Some(FieldType::Json)),
            ("TEXT", Some(FieldType::Text)),
            ("VARCHAR(40)", Some(FieldType::Text)),
            ("CLOB", Some(FieldType::Text)),
            ("", Some(FieldType::Text)),
            ("BLOB", None),
            ("UUID", None),
        ];
        for (declared, expected) in cases {
            assert_eq!(field_type_of(declared), expected, "{declared:?}");
        }
    }

    #[test]
    fn affinity_decides_whether_text_is_kept() {
        assert!(keeps_text("DECIMAL_TEXT"));
        assert!(keeps_text(""));
        assert!(!keeps_text("DECIMAL(38,9)"));
        assert!(!keeps_text("NUMERIC"));
        assert!(!keeps_text("INTEGER"));
    }

    #[test]
    fn quoting_escapes_quotes() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
