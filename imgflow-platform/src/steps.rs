//! What a valid step is: a requested step (an action, `name` for the
//! active version or `name@version` for a pinned one, and its parameters)
//! resolved to one plugin version, and its parameters checked against that
//! version's declaration. The API resolves every step of a job here when it
//! is submitted; the job records the pinned versions and the checked
//! parameters, and the worker runs exactly those.

use imgflow_runtime::metadata::{is_valid_plugin_name, is_valid_version};
use imgflow_runtime::{params, ErrorCode};
use thiserror::Error;

use crate::pipeline::{RequestedParams, Step, StepRequest};
use crate::plugins::{Catalogue, PluginRecord};

/// Why a requested step cannot be run.
#[derive(Debug, Error)]
pub enum StepError {
    /// No active plugin has this name.
    #[error("unknown action {name:?}; available actions: {}", available.join(", "))]
    UnknownAction {
        /// The name asked for.
        name: String,
        /// The active plugins' names.
        available: Vec<String>,
    },
    /// The plugin exists, without this version.
    #[error("plugin {name:?} has no version {version:?}")]
    VersionNotFound {
        /// The plugin.
        name: String,
        /// The version asked for.
        version: String,
    },
    /// The parameters do not fit the version's declaration.
    #[error("{0}")]
    InvalidParams(#[from] params::ParamError),
    /// PostgreSQL failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

impl StepError {
    /// The error's stable code.
    pub fn code(&self) -> ErrorCode {
        match self {
            StepError::UnknownAction { .. } => ErrorCode::UnknownAction,
            StepError::VersionNotFound { .. } => ErrorCode::VersionNotFound,
            StepError::InvalidParams(_) => ErrorCode::InvalidParams,
            StepError::Database(_) => ErrorCode::DatabaseUnavailable,
        }
    }
}

/// A step resolved: pinned to a plugin version, its parameters checked.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The step as the job records it.
    pub step: Step,
    /// Whether the plugin's results may be served from the result cache.
    pub cacheable: bool,
}

/// Resolves `request` against the catalogue (versions remembered briefly,
/// [`Catalogue::lookup`]) and checks its parameters.
pub async fn resolve(catalogue: &Catalogue, request: &StepRequest) -> Result<Resolved, StepError> {
    let plugin = version(catalogue, &request.action).await?;
    let meta = &plugin.metadata.0;
    let checked = match &request.params {
        RequestedParams::Json(json) => params::from_json(&meta.name, &meta.params, json),
        RequestedParams::Pairs(pairs) => params::from_pairs(
            &meta.name,
            &meta.params,
            pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        ),
    }?;
    Ok(Resolved {
        step: Step {
            action: meta.name.clone(),
            version: plugin.version.clone(),
            digest: plugin.digest.clone(),
            params: serde_json::to_value(&checked).unwrap_or_default(),
            run_ms: None,
        },
        cacheable: plugin.cacheable,
    })
}

/// The plugin version an action names: `name` the active version,
/// `name@version` a pinned one (of a plugin that is active).
async fn version(catalogue: &Catalogue, action: &str) -> Result<PluginRecord, StepError> {
    let (name, pinned) = match action.split_once('@') {
        Some((name, version)) => (name, Some(version)),
        None => (action, None),
    };
    let active = if is_valid_plugin_name(name) {
        catalogue.lookup(name, None).await?
    } else {
        None
    };
    match (active, pinned) {
        (Some(active), None) => Ok(active),
        (Some(_), Some(version)) => {
            let found = if is_valid_version(version) {
                catalogue.lookup(name, Some(version)).await?
            } else {
                None
            };
            found.ok_or_else(|| StepError::VersionNotFound {
                name: name.to_string(),
                version: version.to_string(),
            })
        }
        (None, _) => Err(StepError::UnknownAction {
            name: name.to_string(),
            available: catalogue
                .active()
                .await?
                .into_iter()
                .map(|p| p.name)
                .collect(),
        }),
    }
}
