//! The settings of `rest` and `csv` tools, turned from the config into their
//! connectors' own, and the webhook endpoints of `rest` tools, which the agent's
//! HTTP server serves at `/hooks/<tool name>`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use connectors::csv::{CsvCollection, CsvConfig, CsvError};
use connectors::rest::{self, Auth, RestApi, RestCollection, RestConfig, RestError, Webhooks};

use crate::agent::{StartError, collection_specs, tool_error};
use crate::config::{Config, ToolConfig, ToolKind};

/// The webhook endpoints of this agent's tools, by tool name.
pub type WebhookEndpoints = BTreeMap<String, Arc<Webhooks>>;

/// The value of a secret given in the config or in an environment variable.
fn secret(
    config: &Config,
    given: Option<&toml::Spanned<String>>,
    env: Option<&toml::Spanned<String>>,
    field: String,
) -> Result<Option<String>, StartError> {
    match (given, env) {
        (Some(value), _) => Ok(Some(value.get_ref().clone())),
        (None, Some(var)) => match std::env::var(var.get_ref()) {
            Ok(value) => Ok(Some(value)),
            Err(_) => Err(StartError::Config(config.invalid(
                var.span(),
                field,
                format!("the environment variable `{}` is not set", var.get_ref()),
            ))),
        },
        (None, None) => Ok(None),
    }
}

/// A basic-auth user and password, from `user` and `password` or `password_env`.
pub(crate) fn basic_auth(
    config: &Config,
    t: usize,
    tool: &ToolConfig,
) -> Result<Option<(String, String)>, StartError> {
    let password = secret(
        config,
        tool.password.as_ref(),
        tool.password_env.as_ref(),
        format!("tool[{t}].password_env"),
    )?;
    Ok(tool
        .user
        .as_ref()
        .map(|u| (u.get_ref().clone(), password.unwrap_or_default())))
}

/// The webhook endpoint of every `rest` tool that has one.
pub fn webhook_endpoints(config: &Config) -> Result<WebhookEndpoints, StartError> {
    let mut endpoints = BTreeMap::new();
    for (t, tool) in config.tools.iter().enumerate() {
        let Some(hook) = &tool.webhook else { continue };
        let secret = secret(
            config,
            hook.secret.as_ref(),
            hook.secret_env.as_ref(),
            format!("tool[{t}].webhook.secret_env"),
        )?
        .unwrap_or_default();
        let header = hook
            .header
            .as_ref()
            .map_or(rest::webhook::SIGNATURE_HEADER_DEFAULT, |h| h.get_ref());
        let id = hook.id.as_ref().map_or("/record/id", |i| i.get_ref());
        let collection = match &hook.collection {
            Some(c) if c.get_ref().is_empty() => None,
            Some(c) => Some(c.get_ref().as_str()),
            None => Some("/collection"),
        };
        for (field, pointer) in [("id", Some(id)), ("collection", collection)] {
            if let Some(pointer) = pointer
                && !pointer.starts_with('/')
            {
                return Err(StartError::Config(config.invalid(
                    tool.name.span(),
                    format!("tool[{t}].webhook.{field}"),
                    format!("`{pointer}` is not a JSON pointer (they start with `/`)"),
                )));
            }
        }
        endpoints.insert(
            tool.name.get_ref().clone(),
            Arc::new(Webhooks::new(secret.as_bytes(), header, collection, id)),
        );
    }
    Ok(endpoints)
}

fn millis(value: Option<&toml::Spanned<u64>>, default: Duration) -> Duration {
    value.map_or(default, |ms| Duration::from_millis(*ms.get_ref()))
}

/// A `rest` tool's settings; its state file lives in the agent's data folder.
pub(crate) fn rest_config(
    config: &Config,
    t: usize,
    tool: &ToolConfig,
    webhooks: Option<Arc<Webhooks>>,
) -> Result<RestConfig, StartError> {
    let token = secret(
        config,
        tool.token.as_ref(),
        tool.token_env.as_ref(),
        format!("tool[{t}].token_env"),
    )?;
    let auth = match (token, basic_auth(config, t, tool)?) {
        (Some(token), _) => Auth::Bearer(token),
        (None, Some((user, password))) => Auth::Basic(user, password),
        (None, None) => Auth::None,
    };
    Ok(RestConfig {
        url: tool
            .url
            .as_ref()
            .map(|u| u.get_ref().clone())
            .unwrap_or_default(),
        auth,
        poll_interval: millis(tool.poll_interval_ms.as_ref(), rest::POLL_INTERVAL_DEFAULT),
        overlap: millis(tool.overlap_ms.as_ref(), rest::OVERLAP_DEFAULT),
        reconcile_interval: millis(
            tool.reconcile_interval_ms.as_ref(),
            rest::RECONCILE_INTERVAL_DEFAULT,
        ),
        concurrency: tool
            .concurrency
            .as_ref()
            .map_or(rest::CONCURRENCY_DEFAULT, |c| *c.get_ref()),
        timeout: millis(tool.timeout_ms.as_ref(), rest::TIMEOUT_DEFAULT),
        state: config
            .data_dir
            .join("tools")
            .join(format!("{}.rest", tool.name.get_ref())),
        webhooks,
    })
}

/// A `rest` tool's collections with their APIs.
pub(crate) fn rest_collections(
    config: &Config,
    t: usize,
) -> Result<Vec<RestCollection>, StartError> {
    let tool = &config.tools[t];
    let specs = collection_specs(config, t)?;
    Ok(tool
        .collections
        .iter()
        .zip(specs)
        .filter_map(|(c, spec)| {
            let api = c.api.as_ref()?;
            Some(RestCollection {
                spec,
                types: c.types.clone(),
                api: RestApi {
                    list: api.list.get_ref().clone(),
                    get: api.get.get_ref().clone(),
                    create: api.create.get_ref().clone(),
                    update: api.update.get_ref().clone(),
                    delete: api.delete.get_ref().clone(),
                    records: api.records.clone(),
                    record: api.record.clone(),
                    body: api.body.clone(),
                    updated: api.updated.clone().unwrap_or_else(|| "updated".to_owned()),
                    since_format: api
                        .since_format
                        .clone()
                        .unwrap_or_else(|| rest::SINCE_FORMAT_DEFAULT.to_owned()),
                    pagination: api.pagination,
                    page_size: api
                        .page_size
                        .as_ref()
                        .map_or(rest::PAGE_SIZE_DEFAULT, |p| *p.get_ref())
                        .max(1),
                    next_cursor: api.next_cursor.clone(),
                },
            })
        })
        .collect())
}

/// Names the configuration entry behind a REST connector's error at start.
pub(crate) fn rest_error(
    config: &Config,
    t: usize,
    tool: &ToolConfig,
    error: RestError,
) -> StartError {
    if let RestError::Config {
        collection,
        setting,
        message,
    } = &error
        && let Some((i, c)) = tool
            .collections
            .iter()
            .enumerate()
            .find(|(_, c)| c.name.get_ref() == collection)
    {
        let span = c
            .api
            .as_ref()
            .map_or(c.name.span(), |api| match setting.as_str() {
                "list" => api.list.span(),
                "get" => api.get.span(),
                "create" => api.create.span(),
                "update" => api.update.span(),
                "delete" => api.delete.span(),
                _ => c.name.span(),
            });
        return StartError::Config(config.invalid(
            span,
            format!("tool[{t}].collection[{i}].api.{setting}"),
            message.clone(),
        ));
    }
    tool_error(config, t, tool, None, error.to_string())
}

/// A `csv` tool's settings; its state file lives in the agent's data folder.
pub(crate) fn csv_config(config: &Config, tool: &ToolConfig) -> CsvConfig {
    CsvConfig {
        folder: tool
            .path
            .as_ref()
            .map(|p| p.get_ref().clone())
            .unwrap_or_default(),
        state: config
            .data_dir
            .join("tools")
            .join(format!("{}.csv-state", tool.name.get_ref())),
        debounce: millis(tool.debounce_ms.as_ref(), connectors::csv::DEBOUNCE_DEFAULT),
        poll_interval: millis(
            tool.poll_interval_ms.as_ref(),
            connectors::csv::POLL_INTERVAL_DEFAULT,
        ),
    }
}

/// A `csv` tool's files.
pub(crate) fn csv_collections(config: &Config, t: usize) -> Result<Vec<CsvCollection>, StartError> {
    let tool = &config.tools[t];
    let specs = collection_specs(config, t)?;
    Ok(tool
        .collections
        .iter()
        .zip(specs)
        .map(|(c, spec)| CsvCollection {
            spec,
            types: c.types.clone(),
            delimiter: c
                .delimiter
                .as_ref()
                .and_then(|d| d.get_ref().bytes().next()),
        })
        .collect())
}

/// Names the configuration entry behind a CSV connector's error at start.
pub(crate) fn csv_error(
    config: &Config,
    t: usize,
    tool: &ToolConfig,
    error: CsvError,
) -> StartError {
    let at = match &error {
        CsvError::MissingColumn { file, column, .. } => {
            Some((file.clone(), "columns", Some(column.clone())))
        }
        _ => None,
    };
    tool_error(config, t, tool, at, error.to_string())
}

/// The primary key a collection of a tool of `kind` has when none is configured.
pub(crate) fn default_key(kind: ToolKind) -> &'static str {
    match kind {
        ToolKind::Caldav => "uid",
        _ => "id",
    }
}
