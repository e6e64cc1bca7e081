//! Errors of the PostgreSQL connector.

/// Why the PostgreSQL connector could not open, capture or write.
///
/// Configuration errors name the table and column at fault. A value that does not fit
/// its column is not an error: capture reports it as [`RowState::Invalid`] and
/// write-back as a rejected op. The connection string, which may hold a password,
/// is never part of a message.
///
/// [`RowState::Invalid`]: crate::RowState::Invalid
#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    /// The connection string does not parse.
    #[error("the connection string is not valid: {0}")]
    BadUrl(String),
    /// The server cannot be reached.
    #[error("cannot connect to PostgreSQL at {server}: {message}")]
    Connect {
        /// Host and port, or socket folder, and database.
        server: String,
        /// Why.
        message: String,
    },
    /// The server refused the login or the database.
    #[error("PostgreSQL at {server} refused the connection: {message}")]
    Refused {
        /// Host and port, or socket folder, and database.
        server: String,
        /// The server's message.
        message: String,
    },
    /// The connection broke, or a statement failed for a reason that is not the
    /// record's fault.
    #[error("PostgreSQL failed: {0}")]
    Postgres(String),
    /// The server is older than the connector supports.
    #[error(
        "PostgreSQL {version} is too old: Concord needs PostgreSQL 13 or later (for pg_current_xact_id)"
    )]
    TooOld {
        /// The server's version.
        version: String,
    },
    /// A configured table does not exist.
    #[error("table `{table}` does not exist")]
    MissingTable { table: String },
    /// A configured table is a view or another relation that is not a plain table.
    #[error("`{table}` is not a table (it is a {kind}); Concord syncs tables only")]
    NotATable { table: String, kind: String },
    /// A configured table has no PRIMARY KEY.
    #[error("table `{table}` has no PRIMARY KEY; Concord needs one to identify rows")]
    NoPrimaryKey { table: String },
    /// A configured table's PRIMARY KEY spans several columns.
    #[error(
        "table `{table}` has a composite PRIMARY KEY ({columns}); Concord needs a single-column key"
    )]
    CompositePrimaryKey { table: String, columns: String },
    /// The configured primary key is not the table's PRIMARY KEY.
    #[error(
        "table `{table}`: the configured primary key `{configured}` is not the table's PRIMARY KEY `{actual}`"
    )]
    PrimaryKeyMismatch {
        table: String,
        configured: String,
        actual: String,
    },
    /// A configured column does not exist.
    #[error("table `{table}` has no column `{column}`")]
    MissingColumn { table: String, column: String },
    /// A configured column (or the key) has a type Concord cannot sync.
    #[error(
        "table `{table}`: column `{column}` has type `{declared}`, which Concord cannot sync \
         (it syncs smallint, integer, bigint, numeric, real, double precision, boolean, text, \
         varchar, timestamp, timestamptz, date, uuid, json and jsonb columns)"
    )]
    UnsupportedType {
        table: String,
        column: String,
        declared: String,
    },
    /// Two collection specs have the same collection name.
    #[error("collection `{collection}` is configured twice")]
    DuplicateCollection { collection: String },
    /// Two collection specs name the same table.
    #[error("table `{table}` is configured for two collections")]
    DuplicateTable { table: String },
    /// A collection spec names one of Concord's own `_concord_` tables.
    #[error("table `{table}` belongs to Concord's bookkeeping and cannot be synced")]
    ReservedTable { table: String },
    /// A stored capture cursor is not a PostgreSQL outbox cursor (16 bytes).
    #[error("the stored capture cursor has {len} bytes; a PostgreSQL outbox cursor has 16")]
    BadCursor { len: usize },
}

impl From<PostgresError> for crate::ConnectorError {
    fn from(error: PostgresError) -> crate::ConnectorError {
        crate::ConnectorError(Box::new(error))
    }
}

impl From<tokio_postgres::Error> for PostgresError {
    fn from(error: tokio_postgres::Error) -> PostgresError {
        PostgresError::Postgres(describe(&error))
    }
}

/// A driver error as one line: the server's message with its detail and SQLSTATE, or
/// the driver's own.
pub(super) fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => {
            let mut text = db.message().to_owned();
            if let Some(detail) = db.detail() {
                text.push_str(": ");
                text.push_str(detail);
            }
            text.push_str(&format!(" (SQLSTATE {})", db.code().code()));
            text
        }
        None => {
            let mut text = error.to_string();
            let mut source = std::error::Error::source(error);
            while let Some(cause) = source {
                text.push_str(": ");
                text.push_str(&cause.to_string());
                source = cause.source();
            }
            text
        }
    }
}
