//! Table introspection and the capture machinery installed in the database: column
//! types from the catalog, validation of collection specs, the `_concord` schema
//! with its outbox, and the capture triggers.

use std::collections::BTreeMap;

use tokio_postgres::Client;

use super::PostgresError;
use crate::values::{quote_ident, quote_literal};
use crate::{CollectionSpec, FieldType};

/// The schema holding Concord's bookkeeping; user tables may not live in it.
pub(super) const SCHEMA: &str = "_concord";

/// The channel the outbox notifies on.
pub(super) const CHANNEL: &str = "concord_outbox";

/// Creates the bookkeeping schema and tables if missing, and the trigger that
/// notifies the agent after every statement that fills the outbox.
///
/// The outbox is ordered by `(xid, id)`: the writing transaction's id (64 bits, never
/// wrapping), then a sequence. Capture reads only entries of transactions older than
/// every running one, so a transaction that commits late is never skipped.
pub(super) const BOOKKEEPING_SQL: &str = "
CREATE SCHEMA IF NOT EXISTS _concord;
CREATE TABLE IF NOT EXISTS _concord.outbox (
    xid bigint NOT NULL,
    id bigserial NOT NULL,
    tbl text NOT NULL,
    key text NOT NULL,
    old_key text,
    PRIMARY KEY (xid, id)
);
CREATE TABLE IF NOT EXISTS _concord.inserted (
    token text NOT NULL,
    tbl text NOT NULL,
    key text NOT NULL,
    PRIMARY KEY (token, tbl)
);
CREATE TABLE IF NOT EXISTS _concord.owner (
    id integer PRIMARY KEY CHECK (id = 1),
    store bytea NOT NULL,
    rescan_xid bigint NOT NULL,
    rescan_id bigint NOT NULL
);
CREATE OR REPLACE FUNCTION _concord.notify() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
    PERFORM pg_notify('concord_outbox', '');
    RETURN NULL;
END
$f$;
DROP TRIGGER IF EXISTS notify ON _concord.outbox;
CREATE TRIGGER notify AFTER INSERT ON _concord.outbox
    FOR EACH STATEMENT EXECUTE FUNCTION _concord.notify();
";

/// The condition under which a trigger records a change: no write-back of the agent
/// is running in this transaction.
const NOT_ECHO_SQL: &str = "current_setting('concord.writing', true) IS DISTINCT FROM 'on'";

/// The transaction id as the outbox stores it.
const XID_SQL: &str = "pg_current_xact_id()::text::bigint";

/// How Concord reads and writes one PostgreSQL type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PgType {
    /// `smallint`, `integer`, `bigint`.
    Integer,
    /// `numeric`, with its precision and scale when declared.
    Numeric {
        precision: Option<u32>,
        scale: Option<u32>,
    },
    /// `real`, `double precision`.
    Float,
    /// `boolean`.
    Bool,
    /// `text`, or `varchar` with its limit in characters.
    Text { max_chars: Option<u32> },
    /// `timestamp` (without time zone): read and written as UTC.
    Timestamp,
    /// `timestamptz`: an instant.
    Timestamptz,
    /// `date`: midnight UTC.
    Date,
    /// `uuid`, as lower-case text.
    Uuid,
    /// `json` or `jsonb`.
    Json,
}

impl PgType {
    /// The type for a base type name and type modifier, or `None` when Concord cannot
    /// sync it.
    fn of(base: &str, typmod: i32) -> Option<PgType> {
        // A declared modifier is stored as the value plus 4 (VARHDRSZ).
        let modifier = u32::try_from(typmod)
            .ok()
            .filter(|m| *m >= 4)
            .map(|m| m - 4);
        Some(match base {
            "int2" | "int4" | "int8" => PgType::Integer,
            "numeric" => PgType::Numeric {
                precision: modifier.map(|m| (m >> 16) & 0xffff),
                scale: modifier.map(|m| m & 0xffff),
            },
            "float4" | "float8" => PgType::Float,
            "bool" => PgType::Bool,
            "text" => PgType::Text { max_chars: None },
            "varchar" => PgType::Text {
                max_chars: modifier,
            },
            "timestamp" => PgType::Timestamp,
            "timestamptz" => PgType::Timestamptz,
            "date" => PgType::Date,
            "uuid" => PgType::Uuid,
            "json" | "jsonb" => PgType::Json,
            _ => return None,
        })
    }

    /// The field type of values of this type.
    pub(super) fn field_type(self) -> FieldType {
        match self {
            PgType::Integer => FieldType::Integer,
            PgType::Numeric { .. } => FieldType::Decimal,
            PgType::Float => FieldType::Float,
            PgType::Bool => FieldType::Bool,
            PgType::Text { .. } | PgType::Uuid => FieldType::Text,
            PgType::Timestamp | PgType::Timestamptz | PgType::Date => FieldType::Timestamp,
            PgType::Json => FieldType::Json,
        }
    }
}

/// One column Concord reads and writes.
#[derive(Debug, Clone)]
pub(super) struct Column {
    /// The record field name: the column name as configured.
    pub(super) field: String,
    /// The column name, quoted for SQL.
    pub(super) sql_name: String,
    /// The declared type, as PostgreSQL prints it (`numeric(12,2)`).
    pub(super) declared: String,
    /// The type written values are cast to: the declared type without its modifier,
    /// so a cast never truncates or rounds (the column's own check refuses instead).
    pub(super) cast: String,
    /// How values convert.
    pub(super) pg_type: PgType,
}

impl Column {
    /// `CAST($n::text AS type)`: a text parameter turned into the column's type.
    pub(super) fn param(&self, n: usize) -> String {
        format!("CAST(${n}::text AS {})", self.cast)
    }
}

/// A validated collection: its table, key column, synced columns and statements.
#[derive(Debug)]
pub(super) struct Table {
    /// The collection name from the spec.
    pub(super) collection: String,
    /// The table name as configured (what the triggers write into the outbox).
    pub(super) name: String,
    /// The table name, quoted and qualified with its schema, for SQL.
    pub(super) sql_name: String,
    /// The table's oid, which names its trigger functions.
    pub(super) oid: u32,
    /// The primary key column.
    pub(super) key: Column,
    /// The name of the primary key constraint: a unique violation on it means another
    /// transaction inserted the same key concurrently.
    pub(super) key_constraint: String,
    /// The configured columns, in configured order, without duplicates.
    pub(super) columns: Vec<Column>,
    /// Field type per configured column, for reports.
    pub(super) field_types: BTreeMap<String, FieldType>,
    /// Whether the server assigns the key of a row inserted without one (identity,
    /// serial, or any default).
    pub(super) assigns_keys: bool,
    /// Whether the key is `GENERATED ALWAYS AS IDENTITY`: an insert that names it
    /// must say `OVERRIDING SYSTEM VALUE`.
    pub(super) identity_always: bool,
    /// `SELECT key::text, col::text, ... FROM table WHERE key = ANY(keys)`.
    pub(super) select_sql: String,
    /// `DELETE FROM table WHERE key = $1`.
    pub(super) delete_sql: String,
    /// Inserts a row holding only its key unless the row exists.
    pub(super) insert_key_sql: String,
}

/// One column as the catalog describes it.
struct CatalogColumn {
    name: String,
    declared: String,
    cast: String,
    base: String,
    typmod: i32,
    identity: String,
    has_default: bool,
}

impl Table {
    /// Checks `spec` against the catalog and derives the column types.
    pub(super) async fn validate(
        client: &Client,
        spec: &CollectionSpec,
    ) -> Result<Table, PostgresError> {
        let table = spec.table.as_str();
        let (schema, _) = split_table(table);
        if schema == Some(SCHEMA) {
            return Err(PostgresError::ReservedTable {
                table: table.to_owned(),
            });
        }
        let relation = client
            .query_opt(
                "SELECT c.oid, c.relkind::text, n.nspname::text, c.relname::text
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE c.oid = to_regclass($1)",
                &[&quote_table(table)],
            )
            .await?;
        let Some(relation) = relation else {
            return Err(PostgresError::MissingTable {
                table: table.to_owned(),
            });
        };
        let oid: u32 = relation.get(0);
        let kind: String = relation.get(1);
        // Qualified with its schema: the trigger functions run with a fixed search
        // path, and the agent's connection may have another one than the users'.
        let sql_name = format!(
            "{}.{}",
            quote_ident(&relation.get::<_, String>(2)),
            quote_ident(&relation.get::<_, String>(3))
        );
        if relation.get::<_, String>(2) == SCHEMA {
            return Err(PostgresError::ReservedTable {
                table: table.to_owned(),
            });
        }
        if !matches!(kind.as_str(), "r" | "p") {
            let kind = match kind.as_str() {
                "v" => "view",
                "m" => "materialized view",
                "f" => "foreign table",
                _ => "relation of another kind",
            };
            return Err(PostgresError::NotATable {
                table: table.to_owned(),
                kind: kind.to_owned(),
            });
        }
        let catalog: Vec<CatalogColumn> = client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod),
                        format_type(a.atttypid, NULL), b.typname::text,
                        CASE WHEN t.typtype = 'd' THEN t.typtypmod ELSE a.atttypmod END,
                        a.attidentity::text, a.atthasdef
                 FROM pg_attribute a
                 JOIN pg_type t ON t.oid = a.atttypid
                 JOIN pg_type b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
                 WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
                 ORDER BY a.attnum",
                &[&oid],
            )
            .await?
            .into_iter()
            .map(|row| CatalogColumn {
                name: row.get(0),
                declared: row.get(1),
                cast: row.get(2),
                base: row.get(3),
                typmod: row.get(4),
                identity: row.get(5),
                has_default: row.get(6),
            })
            .collect();
        let key_rows = client
            .query(
                "SELECT a.attname::text, con.conname::text
                 FROM pg_constraint con
                 JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = ANY(con.conkey)
                 WHERE con.conrelid = $1 AND con.contype = 'p'",
                &[&oid],
            )
            .await?;
        let (key_name, key_constraint) = match key_rows.as_slice() {
            [] => {
                return Err(PostgresError::NoPrimaryKey {
                    table: table.to_owned(),
                });
            }
            [row] => (row.get::<_, String>(0), row.get::<_, String>(1)),
            several => {
                let names: Vec<String> = several.iter().map(|row| row.get(0)).collect();
                return Err(PostgresError::CompositePrimaryKey {
                    table: table.to_owned(),
                    columns: names.join(", "),
                });
            }
        };
        if !key_name.eq_ignore_ascii_case(&spec.primary_key) {
            return Err(PostgresError::PrimaryKeyMismatch {
                table: table.to_owned(),
                configured: spec.primary_key.clone(),
                actual: key_name,
            });
        }
        let key_catalog =
            find_column(&catalog, &key_name).ok_or_else(|| PostgresError::MissingColumn {
                table: table.to_owned(),
                column: key_name.clone(),
            })?;
        let key = column(table, &spec.primary_key, key_catalog)?;
        if !matches!(
            key.pg_type,
            PgType::Integer | PgType::Text { .. } | PgType::Uuid
        ) {
            return Err(PostgresError::UnsupportedType {
                table: table.to_owned(),
                column: key_name,
                declared: format!("{} as a primary key", key.declared),
            });
        }
        let mut columns: Vec<Column> = Vec::with_capacity(spec.columns.len());
        for configured in &spec.columns {
            if columns
                .iter()
                .any(|column| column.field.eq_ignore_ascii_case(configured))
            {
                continue;
            }
            let found =
                find_column(&catalog, configured).ok_or_else(|| PostgresError::MissingColumn {
                    table: table.to_owned(),
                    column: configured.clone(),
                })?;
            columns.push(column(table, configured, found)?);
        }
        let key_sql = &key.sql_name;
        let mut selected = format!("{key_sql}::text");
        for column in &columns {
            selected.push_str(&format!(", {}::text", column.sql_name));
        }
        let select_sql = format!(
            "SELECT {selected} FROM {sql_name} WHERE {key_sql} = ANY(CAST($1::text[] AS {}[]))",
            key.cast
        );
        let delete_sql = format!("DELETE FROM {sql_name} WHERE {key_sql} = {}", key.param(1));
        let identity_always = key_catalog.identity == "a";
        let overriding = if identity_always {
            " OVERRIDING SYSTEM VALUE"
        } else {
            ""
        };
        let insert_key_sql = format!(
            "INSERT INTO {sql_name} ({key_sql}){overriding} VALUES ({}) ON CONFLICT DO NOTHING",
            key.param(1)
        );
        let field_types = columns
            .iter()
            .map(|column| (column.field.clone(), column.pg_type.field_type()))
            .collect();
        Ok(Table {
            collection: spec.collection.clone(),
            name: table.to_owned(),
            sql_name,
            oid,
            assigns_keys: !key_catalog.identity.is_empty() || key_catalog.has_default,
            identity_always,
            key,
            key_constraint,
            columns,
            field_types,
            select_sql,
            delete_sql,
            insert_key_sql,
        })
    }

    /// The SQL that (re)creates this table's capture functions and triggers.
    ///
    /// A row trigger appends `(table, key)` to the outbox for every insert, update and
    /// delete, unless a write-back of the agent is running in the transaction; an
    /// update that changes the key appends one entry for the new key naming the old
    /// one. A TRUNCATE queues every key first, so the emptied table is captured as
    /// deletes. The functions run as their owner (the agent's role, which owns the
    /// outbox), so users who may not touch the outbox can still write their tables.
    pub(super) fn triggers_sql(&self) -> String {
        let table = &self.sql_name;
        let literal = quote_literal(&self.name);
        let key = &self.key.sql_name;
        let oid = self.oid;
        format!(
            "CREATE OR REPLACE FUNCTION _concord.capture_{oid}() RETURNS trigger
                 LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
             BEGIN
                 IF TG_OP = 'DELETE' THEN
                     INSERT INTO _concord.outbox (xid, tbl, key)
                         VALUES ({XID_SQL}, {literal}, OLD.{key}::text);
                 ELSIF TG_OP = 'UPDATE' AND OLD.{key} IS DISTINCT FROM NEW.{key} THEN
                     INSERT INTO _concord.outbox (xid, tbl, key, old_key)
                         VALUES ({XID_SQL}, {literal}, NEW.{key}::text, OLD.{key}::text);
                 ELSE
                     INSERT INTO _concord.outbox (xid, tbl, key)
                         VALUES ({XID_SQL}, {literal}, NEW.{key}::text);
                 END IF;
                 RETURN NULL;
             END
             $f$;
             CREATE OR REPLACE FUNCTION _concord.truncate_{oid}() RETURNS trigger
                 LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
             BEGIN
                 INSERT INTO _concord.outbox (xid, tbl, key)
                     SELECT {XID_SQL}, {literal}, {key}::text FROM {table};
                 RETURN NULL;
             END
             $f$;
             CREATE TRIGGER _concord_capture AFTER INSERT OR UPDATE OR DELETE ON {table}
                 FOR EACH ROW WHEN ({NOT_ECHO_SQL}) EXECUTE FUNCTION _concord.capture_{oid}();
             CREATE TRIGGER _concord_truncate BEFORE TRUNCATE ON {table}
                 FOR EACH STATEMENT WHEN ({NOT_ECHO_SQL}) EXECUTE FUNCTION _concord.truncate_{oid}();"
        )
    }

    /// Queues every existing row of the table in the outbox: the initial import of a
    /// table whose capture is installed for the first time.
    pub(super) fn import_sql(&self) -> String {
        format!(
            "INSERT INTO _concord.outbox (xid, tbl, key)
             SELECT {XID_SQL}, {literal}, {key}::text FROM {table} ORDER BY {key}",
            literal = quote_literal(&self.name),
            key = self.key.sql_name,
            table = self.sql_name,
        )
    }
}

/// The oids of the tables that carry Concord's capture trigger now.
pub(super) async fn captured_tables(client: &Client) -> Result<Vec<u32>, PostgresError> {
    Ok(client
        .query(
            "SELECT tgrelid FROM pg_trigger WHERE tgname = '_concord_capture'",
            &[],
        )
        .await?
        .into_iter()
        .map(|row| row.get(0))
        .collect())
}

/// Drops Concord's triggers from every table, so that re-opening with a changed
/// configuration leaves exactly the current ones.
pub(super) async fn drop_triggers(client: &Client) -> Result<(), PostgresError> {
    let rows = client
        .query(
            "SELECT tgname::text, tgrelid::regclass::text FROM pg_trigger
             WHERE tgname IN ('_concord_capture', '_concord_truncate')",
            &[],
        )
        .await?;
    for row in rows {
        let (name, table): (String, String) = (row.get(0), row.get(1));
        // `regclass` prints the name quoted where it needs quotes.
        client
            .batch_execute(&format!("DROP TRIGGER IF EXISTS {name} ON {table}"))
            .await?;
    }
    Ok(())
}

/// The catalog column named `name`: exactly, else ignoring ASCII case.
fn find_column<'a>(catalog: &'a [CatalogColumn], name: &str) -> Option<&'a CatalogColumn> {
    catalog
        .iter()
        .find(|c| c.name == name)
        .or_else(|| catalog.iter().find(|c| c.name.eq_ignore_ascii_case(name)))
}

/// The column for a catalog entry, if Concord can sync its type.
fn column(table: &str, field: &str, found: &CatalogColumn) -> Result<Column, PostgresError> {
    let pg_type =
        PgType::of(&found.base, found.typmod).ok_or_else(|| PostgresError::UnsupportedType {
            table: table.to_owned(),
            column: found.name.clone(),
            declared: found.declared.clone(),
        })?;
    Ok(Column {
        field: field.to_owned(),
        sql_name: quote_ident(&found.name),
        declared: found.declared.clone(),
        cast: found.cast.clone(),
        pg_type,
    })
}

/// A configured table name as schema and name: `sales.orders` is table `orders` in
/// schema `sales`; a name without a dot is found through the search path.
fn split_table(table: &str) -> (Option<&str>, &str) {
    match table.split_once('.') {
        Some((schema, name)) => (Some(schema), name),
        None => (None, table),
    }
}

/// A configured table name quoted for SQL: `sales.orders` becomes `"sales"."orders"`.
pub(super) fn quote_table(table: &str) -> String {
    match split_table(table) {
        (Some(schema), name) => format!("{}.{}", quote_ident(schema), quote_ident(name)),
        (None, name) => quote_ident(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_follow_the_catalog() {
        assert_eq!(PgType::of("int8", -1), Some(PgType::Integer));
        assert_eq!(
            PgType::of("numeric", (12 << 16 | 2) + 4),
            Some(PgType::Numeric {
                precision: Some(12),
                scale: Some(2)
            })
        );
        assert_eq!(
            PgType::of("numeric", -1),
            Some(PgType::Numeric {
                precision: None,
                scale: None
            })
        );
        assert_eq!(
            PgType::of("varchar", 40 + 4),
            Some(PgType::Text {
                max_chars: Some(40)
            })
        );
        assert_eq!(PgType::of("bytea", -1), None);
        assert_eq!(PgType::of("interval", -1), None);
        assert_eq!(PgType::of("bpchar", 5 + 4), None);
    }

    #[test]
    fn table_names_are_quoted_with_their_schema() {
        assert_eq!(quote_table("sales.orders"), "\"sales\".\"orders\"");
        assert_eq!(quote_table("My \"T\""), "\"My \"\"T\"\"\"");
    }
}
