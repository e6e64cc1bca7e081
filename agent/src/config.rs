//! The agent's configuration file (TOML).
//!
//! Every table refuses unknown keys, and every error names the file, the line and
//! the field, so a typo never silently turns a setting off.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::identity::PeerId;

/// A configuration that cannot be used, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not fit the schema (names line and field).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line, column and field.
        message: String,
    },
    /// A value is well-formed but not acceptable.
    #[error("{path}:{line}: `{field}`: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The line of the offending value (1-based).
        line: usize,
        /// The field's dotted name.
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the agent keeps its store (relative paths are relative to the file).
    pub data_dir: PathBuf,
    /// The agent's key and certificate, made by `concord init`.
    pub key_file: PathBuf,
    /// The UDP address to listen on for peers.
    pub listen: SocketAddr,
    /// The peers this agent trusts; any other is refused.
    #[serde(default, rename = "peer")]
    pub peers: Vec<PeerConfig>,
    /// The SQLite database this agent keeps in sync.
    pub sqlite: SqliteConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// The file this was read from (set by [`Config::load`]).
    #[serde(skip)]
    pub path: PathBuf,
    /// The file's text, to turn spans into line numbers.
    #[serde(skip)]
    source: String,
}

/// One trusted peer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// The peer's id, as printed by its `concord init`.
    pub id: Spanned<String>,
    /// Where to dial it; without one the agent only accepts its calls.
    #[serde(default)]
    pub addr: Option<SocketAddr>,
}

/// The SQLite tool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqliteConfig {
    /// The database file.
    pub path: PathBuf,
    /// The tool's name in documents (external ids, shadows); defaults to `sqlite`.
    #[serde(default = "default_tool_name")]
    pub name: String,
    /// The collections synced from this database.
    #[serde(rename = "collection")]
    pub collections: Vec<CollectionConfig>,
}

/// One synced table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectionConfig {
    /// The collection's name, the same on every agent.
    pub name: Spanned<String>,
    /// The table.
    pub table: Spanned<String>,
    /// The table's primary key column.
    pub primary_key: Spanned<String>,
    /// The columns synced.
    pub columns: Spanned<Vec<String>>,
}

/// Logging settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (default) or `json`.
    #[serde(default)]
    pub format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

fn default_tool_name() -> String {
    "sqlite".to_owned()
}

impl Config {
    /// Reads and checks the file at `path`; relative paths in it become relative to its folder.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let source = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(path, source)
    }

    /// Parses `source` as if read from `path`.
    pub fn parse(path: &Path, source: String) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(&source).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        config.path = path.to_owned();
        config.source = source;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut config.data_dir,
            &mut config.key_file,
            &mut config.sqlite.path,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), ConfigError> {
        for (i, peer) in self.peers.iter().enumerate() {
            if let Err(e) = peer.id.get_ref().parse::<PeerId>() {
                return Err(self.invalid(peer.id.span(), format!("peer[{i}].id"), e.to_string()));
            }
        }
        if self.sqlite.collections.is_empty() {
            return Err(ConfigError::Parse {
                path: self.path.clone(),
                message: "`sqlite.collection`: at least one collection is needed".to_owned(),
            });
        }
        for (i, c) in self.sqlite.collections.iter().enumerate() {
            if c.name.get_ref().is_empty() || c.name.get_ref().contains(['\0', '/']) {
                return Err(self.invalid(
                    c.name.span(),
                    format!("sqlite.collection[{i}].name"),
                    "a collection name is non-empty and has no `/` or NUL".to_owned(),
                ));
            }
            if c.columns.get_ref().is_empty() {
                return Err(self.invalid(
                    c.columns.span(),
                    format!("sqlite.collection[{i}].columns"),
                    "list at least one column".to_owned(),
                ));
            }
            let dup = self.sqlite.collections[..i]
                .iter()
                .any(|o| o.name.get_ref() == c.name.get_ref());
            if dup {
                return Err(self.invalid(
                    c.name.span(),
                    format!("sqlite.collection[{i}].name"),
                    format!("collection `{}` is configured twice", c.name.get_ref()),
                ));
            }
        }
        Ok(())
    }

    /// The trusted peers' ids.
    pub fn peer_ids(&self) -> Vec<PeerId> {
        self.peers
            .iter()
            .filter_map(|p| p.id.get_ref().parse().ok())
            .collect()
    }

    /// An error about the value at `span`, naming its line.
    pub fn invalid(&self, span: Range<usize>, field: String, message: String) -> ConfigError {
        let line = self.source[..span.start.min(self.source.len())]
            .matches('\n')
            .count()
            + 1;
        ConfigError::Invalid {
            path: self.path.clone(),
            line,
            field,
            message,
        }
    }
}

/// The commented configuration `concord init` writes.
pub fn template(listen: SocketAddr, peer_id: &PeerId) -> String {
    format!(
        r#"# Concord agent configuration. This agent's peer id: {peer_id}
# Give that id to the peers that should trust this agent.

# Where the agent keeps its store (documents, change logs, cursors).
data_dir = "data"
# This agent's key and certificate (keep it private).
key_file = "concord.key"
# The UDP address peers reach this agent at.
listen = "{listen}"

# Each trusted peer: its id (from its `concord init`) and, optionally, where to dial it.
# [[peer]]
# id = "..."
# addr = "127.0.0.1:7401"

[sqlite]
# The database kept in sync.
path = "app.db"
# This tool's name in the documents.
name = "sqlite"

# Each synced table. The collection name must match on every agent.
[[sqlite.collection]]
name = "customers"
table = "customers"
primary_key = "id"
columns = ["name", "email"]

[log]
# "text" or "json"
format = "text"
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
data_dir = "data"
key_file = "k.pem"
listen = "127.0.0.1:7400"

[sqlite]
path = "a.db"

[[sqlite.collection]]
name = "customers"
table = "customers"
primary_key = "id"
columns = ["name"]
"#;

    #[test]
    fn a_good_file_loads_with_paths_made_relative_to_it() -> Result<(), ConfigError> {
        let config = Config::parse(Path::new("/etc/concord/agent.toml"), GOOD.to_owned())?;
        assert_eq!(config.sqlite.path, Path::new("/etc/concord/a.db"));
        assert_eq!(config.sqlite.name, "sqlite");
        Ok(())
    }

    #[test]
    fn an_unknown_key_names_file_line_and_key() {
        let bad = GOOD.replace(
            "table = \"customers\"",
            "table = \"customers\"\ncolums = [\"x\"]",
        );
        let err = Config::parse(Path::new("agent.toml"), bad)
            .expect_err("unknown key")
            .to_string();
        assert!(err.contains("agent.toml"), "{err}");
        assert!(err.contains("line 12"), "{err}");
        assert!(err.contains("colums"), "{err}");
    }

    #[test]
    fn a_bad_peer_id_names_its_line() {
        let bad = GOOD.replacen("[sqlite]", "[[peer]]\nid = \"nope\"\n\n[sqlite]", 1);
        let err = Config::parse(Path::new("agent.toml"), bad)
            .expect_err("bad id")
            .to_string();
        assert!(err.starts_with("agent.toml:7: `peer[0].id`"), "{err}");
    }

    #[test]
    fn the_template_parses() -> Result<(), ConfigError> {
        let id: PeerId = "a".repeat(52).parse().expect("a valid id");
        let text = template("127.0.0.1:7400".parse().expect("addr"), &id);
        Config::parse(Path::new("concord.toml"), text)?;
        Ok(())
    }
}
