//! Errors of the SQLite connector.

/// Why the SQLite connector could not open, capture or write.
///
/// Configuration errors name the table and column at fault. A value that does not fit
/// its column is not an error: capture reports it as [`RowState::Invalid`] and
/// write-back as a rejected op.
///
/// [`RowState::Invalid`]: super::RowState::Invalid
#[derive(Debug, thiserror::Error)]
pub enum SqliteError {
    /// SQLite failed: the file cannot be opened, the database stayed locked past the busy timeout, or IO failed.
    #[error("SQLite failed: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The configured database file does not exist; Concord never creates it.
    #[error(
        "the database does not exist; Concord syncs an existing database and never creates one"
    )]
    MissingDatabase { path: std::path::PathBuf },
    /// A configured table does not exist in the database.
    #[error("table `{table}` does not exist")]
    MissingTable { table: String },
    /// A configured table is a view, which has no rows of its own to capture or write.
    #[error("`{table}` is a view; Concord syncs tables only")]
    NotATable { table: String },
    /// A configured table has no PRIMARY KEY, so its rows cannot be identified.
    #[error("table `{table}` has no PRIMARY KEY; Concord needs one to identify rows")]
    NoPrimaryKey { table: String },
    /// A configured table's PRIMARY KEY spans several columns.
    #[error(
        "table `{table}` has a composite PRIMARY KEY ({columns}); Concord needs a single-column key"
    )]
    CompositePrimaryKey { table: String, columns: String },
    /// The configured primary key column is not the table's PRIMARY KEY.
    #[error(
        "table `{table}`: the configured primary key `{configured}` is not the table's PRIMARY KEY `{actual}`"
    )]
    PrimaryKeyMismatch {
        table: String,
        configured: String,
        actual: String,
    },
    /// A configured column does not exist in its table.
    #[error("table `{table}` has no column `{column}`")]
    MissingColumn { table: String, column: String },
    /// A configured column's declared type maps to no field type (e.g. `BLOB`).
    #[error(
        "table `{table}`: column `{column}` is declared `{declared}`, which Concord cannot sync \
         (it syncs INTEGER, REAL, DECIMAL, TEXT, BOOLEAN, TIMESTAMP, DATE and JSON columns)"
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
    /// A stored capture cursor is not an outbox seq (8 bytes).
    #[error("the stored capture cursor has {len} bytes; a SQLite outbox cursor has 8")]
    BadCursor { len: usize },
}

impl From<SqliteError> for crate::ConnectorError {
    fn from(error: SqliteError) -> crate::ConnectorError {
        crate::ConnectorError(Box::new(error))
    }
}
