//! `concord check`: validates a configuration against the real tools without
//! running the agent or changing anything in a tool.

use std::collections::{BTreeMap, BTreeSet};

use connectors::{caldav, postgres, sqlite};

use crate::agent::{
    StartError, ToolSchema, caldav_config, caldav_error, collection_specs, postgres_config,
    postgres_error, sqlite_error, sqlite_path, tool_specs,
};
use crate::config::{Config, ToolKind};
use crate::mapping;

/// What a configuration that passed its check holds, and what deserves a look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// Tools checked against their schema.
    pub tools: usize,
    /// Collections synced or relayed.
    pub collections: usize,
    /// Things that are allowed but may be mistakes, one sentence each.
    pub notes: Vec<String>,
}

/// Checks `config`: its syntax (done by loading it), every mapping and expression,
/// natural keys and identities, and every mapped column against the tool's real
/// schema. Each error names the file, the line and the entry.
pub fn check(config: &Config) -> Result<CheckReport, StartError> {
    let mut schemas = Vec::with_capacity(config.tools.len());
    for (t, tool) in config.tools.iter().enumerate() {
        let specs = collection_specs(config, t)?;
        let schema = match tool.kind.get_ref() {
            ToolKind::Sqlite => {
                let path = sqlite_path(tool);
                let tables = sqlite::inspect(&path, &specs)
                    .map_err(|e| sqlite_error(config, t, tool, &path, e))?;
                ToolSchema {
                    kind: "sqlite",
                    tables,
                }
            }
            ToolKind::Postgres => {
                let tables = postgres::inspect(&postgres_config(tool), &specs)
                    .map_err(|e| postgres_error(config, t, tool, e))?;
                ToolSchema {
                    kind: "postgres",
                    tables,
                }
            }
            ToolKind::Caldav => {
                let tables = caldav::inspect(&caldav_config(config, t, tool)?, &specs)
                    .map_err(|e| caldav_error(config, t, tool, e))?;
                ToolSchema {
                    kind: "caldav",
                    tables,
                }
            }
            ToolKind::Rest => {
                let rest = crate::apps::rest_config(config, t, tool, None)?;
                let tables =
                    connectors::rest::inspect(&rest, crate::apps::rest_collections(config, t)?)
                        .map_err(|e| crate::apps::rest_error(config, t, tool, e))?;
                ToolSchema {
                    kind: "rest",
                    tables,
                }
            }
            ToolKind::Csv => {
                let csv = crate::apps::csv_config(config, tool);
                let tables =
                    connectors::csv::inspect(&csv, &crate::apps::csv_collections(config, t)?)
                        .map_err(|e| crate::apps::csv_error(config, t, tool, e))?;
                ToolSchema {
                    kind: "csv",
                    tables,
                }
            }
        };
        schemas.push(schema);
    }
    let specs = tool_specs(config, "check", &schemas)?;
    let mut collections: BTreeSet<&str> = BTreeSet::new();
    for shared in &config.collections {
        mapping::natural_key(config, shared.name.get_ref())?;
        collections.insert(shared.name.get_ref());
    }
    // Per collection, the canonical fields some tool of this agent maps.
    let mut known: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for spec in &specs {
        for (name, info) in &spec.collections {
            collections.insert(name);
            known.entry(name).or_default().extend(info.mapping.fields());
        }
    }
    let mut notes = Vec::new();
    for spec in &specs {
        for (name, info) in &spec.collections {
            let fields = &known[name.as_str()];
            for (source, variables) in info.mapping.expressions() {
                for variable in variables.iter().filter(|v| !fields.contains(v.as_str())) {
                    notes.push(format!(
                        "tool `{}`, collection `{name}`: `{source}` reads `{variable}`, which no \
                         tool of this agent maps; it is null unless a peer's tool provides it",
                        spec.name
                    ));
                }
            }
            if let Some(natural) = &info.natural_key {
                let read: BTreeSet<&str> = info.mapping.fields_read().collect();
                if !natural.fields().any(|f| read.contains(f)) {
                    notes.push(format!(
                        "tool `{}`, collection `{name}`: reads none of the natural key's fields, \
                         so its new records are never matched to existing ones",
                        spec.name
                    ));
                }
            }
        }
    }
    Ok(CheckReport {
        tools: specs.len(),
        collections: collections.len(),
        notes,
    })
}
