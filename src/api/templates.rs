//! `/v1/templates`: primed snapshots to create sandboxes from (built by
//! booting and running a command, or taken from a running sandbox), and
//! forks of them.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::extract::{check_name, Json, Path};
use super::model::{timestamp, CreateSandbox, Sandbox};
use super::sandboxes::{blocking, boot_files, create_error, lifecycle};
use crate::daemon::templates::TemplateSpec;
use crate::daemon::AppState;
use crate::store::TemplateRecord;

/// The most sandboxes one fork makes.
const MAX_FORKS: u32 = 100;

/// POST /v1/templates
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTemplate {
    #[schema(pattern = "^[a-z0-9][a-z0-9._-]{0,62}$")]
    pub name: String,
    /// An ext4 root filesystem image on the daemon's host, by absolute
    /// path (copied).
    #[schema(pattern = "^/")]
    pub rootfs: Option<String>,
    #[schema(pattern = "^/")]
    pub kernel: Option<String>,
    #[schema(pattern = "^/")]
    pub initramfs: Option<String>,
    /// vCPUs, 1 to 64 (default 1).
    #[serde(default, deserialize_with = "crate::json_num::opt_u32")]
    #[schema(minimum = 1, maximum = 64)]
    pub cpus: Option<u32>,
    /// Memory in MiB, 32 to 1048576 (default 256).
    #[serde(default, deserialize_with = "crate::json_num::opt_u32")]
    #[schema(minimum = 32, maximum = 1048576)]
    pub memory_mib: Option<u32>,
    /// Run once the guest is ready, before the snapshot; it must exit 0.
    #[serde(default)]
    pub cmd: Vec<String>,
    /// How long `cmd` may run (default 600, at most a day).
    #[serde(default, deserialize_with = "crate::json_num::opt_u64")]
    #[schema(minimum = 1, maximum = 86400)]
    pub timeout_seconds: Option<u64>,
}

/// A template: what sandboxes made from it start as.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Template {
    pub name: String,
    /// `template` (built) or `snapshot` (of a running sandbox).
    pub kind: String,
    pub cpus: u32,
    pub memory_mib: u32,
    pub has_rootfs: bool,
    /// What it was made from.
    #[schema(value_type = Object)]
    pub source: serde_json::Value,
    pub created_at: String,
}

impl From<&TemplateRecord> for Template {
    fn from(t: &TemplateRecord) -> Self {
        Template {
            name: t.name.clone(),
            kind: t.kind.clone(),
            cpus: t.cpus,
            memory_mib: t.memory_mib,
            has_rootfs: t.has_rootfs,
            source: t.source.clone(),
            created_at: timestamp(t.created_at),
        }
    }
}

/// Build a template: boot, run `cmd`, snapshot. Answers once it is ready.
#[utoipa::path(
    post, path = "/v1/templates", tag = "templates", operation_id = "create_template",
    request_body = CreateTemplate,
    responses(
        (status = 201, description = "Built", body = Template),
        (status = 400, description = "Bad input", body = ErrorBody),
        (status = 404, description = "No such file (rootfs, kernel, initramfs)", body = ErrorBody),
        (status = 409, description = "The name is taken", body = ErrorBody),
        (status = 429, description = "The host runs its most sandboxes", body = ErrorBody),
        (status = 500, description = "It could not be built (the message says why)", body = ErrorBody),
    )
)]
pub async fn create(
    State(state): State<Arc<AppState>>,
    Json(body): Json<CreateTemplate>,
) -> Result<impl IntoResponse, ApiError> {
    check_name("template", &body.name)?;
    let probe = CreateSandbox {
        cpus: body.cpus,
        memory_mib: body.memory_mib,
        ..Default::default()
    };
    let (cpus, memory_mib) = probe.size()?;
    if body.cmd.iter().any(|a| a.contains('\0')) {
        return Err(ApiError::bad_request("cmd may not contain NUL"));
    }
    let timeout = body.timeout_seconds.unwrap_or(600);
    if !(1..=24 * 3600).contains(&timeout) {
        return Err(ApiError::bad_request("timeout_seconds must be 1 to 86400"));
    }
    let (kernel, initramfs, rootfs) =
        boot_files(&state, &body.kernel, &body.initramfs, &body.rootfs)?;
    let spec = TemplateSpec {
        kernel,
        initramfs,
        rootfs,
        cpus,
        memory_mib,
        cmd: body.cmd.clone(),
        timeout: std::time::Duration::from_secs(timeout),
    };
    let supervisor = Arc::clone(&state.supervisor);
    let name = body.name.clone();
    let record = blocking(move || supervisor.build_template(&name, &spec))
        .await?
        .map_err(|e| lifecycle(e, "template_failed"))?;
    Ok((StatusCode::CREATED, axum::Json(Template::from(&record))))
}

/// List templates and snapshots.
#[utoipa::path(
    get, path = "/v1/templates", tag = "templates", operation_id = "list_templates",
    responses((status = 200, description = "Every template", body = [Template]))
)]
pub async fn list(
    State(state): State<Arc<AppState>>,
) -> Result<axum::Json<Vec<Template>>, ApiError> {
    let records = state.supervisor.store().templates()?;
    Ok(axum::Json(records.iter().map(Template::from).collect()))
}

/// One template.
#[utoipa::path(
    get, path = "/v1/templates/{name}", tag = "templates", operation_id = "get_template",
    params(("name" = String, Path, description = "Template name")),
    responses(
        (status = 200, description = "The template", body = Template),
        (status = 404, description = "No such template", body = ErrorBody),
    )
)]
pub async fn get_one(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<axum::Json<Template>, ApiError> {
    Ok(axum::Json(Template::from(
        &state.supervisor.store().template(&name)?,
    )))
}

/// Delete a template. Sandboxes made from it keep running (and resuming).
#[utoipa::path(
    delete, path = "/v1/templates/{name}", tag = "templates", operation_id = "delete_template",
    params(("name" = String, Path, description = "Template name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such template", body = ErrorBody),
    )
)]
pub async fn delete(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let supervisor = Arc::clone(&state.supervisor);
    blocking(move || supervisor.delete_template(&name)).await??;
    Ok(StatusCode::NO_CONTENT)
}

/// POST /v1/sandboxes/{id}/snapshot
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotSandbox {
    /// The name of the template the snapshot becomes.
    #[schema(pattern = "^[a-z0-9][a-z0-9._-]{0,62}$")]
    pub name: String,
}

/// Snapshot a running sandbox into a template it can be forked from; the
/// sandbox carries on.
#[utoipa::path(
    post, path = "/v1/sandboxes/{id}/snapshot", tag = "sandboxes", operation_id = "snapshot_sandbox",
    params(("id" = String, Path, description = "Sandbox id")),
    request_body = SnapshotSandbox,
    responses(
        (status = 201, description = "Taken", body = Template),
        (status = 400, description = "Bad name", body = ErrorBody),
        (status = 404, description = "No such sandbox", body = ErrorBody),
        (status = 409, description = "It is not running, or the name is taken", body = ErrorBody),
        (status = 500, description = "It could not be taken", body = ErrorBody),
    )
)]
pub async fn snapshot(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Json(body): Json<SnapshotSandbox>,
) -> Result<impl IntoResponse, ApiError> {
    state.supervisor.store().sandbox(&id)?;
    check_name("template", &body.name)?;
    let supervisor = Arc::clone(&state.supervisor);
    let record = blocking(move || supervisor.snapshot_sandbox(&id, &body.name))
        .await?
        .map_err(|e| lifecycle(e, "snapshot_failed"))?;
    Ok((StatusCode::CREATED, axum::Json(Template::from(&record))))
}

/// POST /v1/templates/{name}/fork
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkTemplate {
    /// How many sandboxes, 1 to 100.
    #[serde(deserialize_with = "crate::json_num::u32")]
    #[schema(minimum = 1, maximum = 100)]
    pub count: u32,
    #[schema(pattern = "^[a-z0-9][a-z0-9._-]{0,62}$")]
    pub group: Option<String>,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    #[serde(default, deserialize_with = "crate::json_num::opt_u64")]
    #[schema(minimum = 0, maximum = 2592000)]
    pub timeout_seconds: Option<u64>,
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Environment every command in each fork gets.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
}

/// One fork: the sandbox, or why it was not made.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Fork {
    pub sandbox: Option<Sandbox>,
    pub error: Option<ErrorBody>,
}

/// Make `count` sandboxes from a template at once, each with its own
/// identity. Each fork is reported on its own: some may be refused (a
/// quota) while others are made.
#[utoipa::path(
    post, path = "/v1/templates/{name}/fork", tag = "templates", operation_id = "fork_template",
    params(("name" = String, Path, description = "Template name")),
    request_body = ForkTemplate,
    responses(
        (status = 201, description = "One entry per fork", body = [Fork]),
        (status = 400, description = "Bad input", body = ErrorBody),
        (status = 404, description = "No such template or group", body = ErrorBody),
    )
)]
pub async fn fork(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Json(body): Json<ForkTemplate>,
) -> Result<impl IntoResponse, ApiError> {
    state.supervisor.store().template(&name)?;
    if !(1..=MAX_FORKS).contains(&body.count) {
        return Err(ApiError::bad_request(format!(
            "count must be 1 to {MAX_FORKS}"
        )));
    }
    let create = CreateSandbox {
        template: Some(name),
        group: body.group.clone(),
        labels: body.labels.clone(),
        timeout_seconds: body.timeout_seconds,
        secrets: body.secrets.clone(),
        env: body.env.clone(),
        ..Default::default()
    };
    let spec = create.spec(&state)?;
    let handles: Vec<_> = (0..body.count)
        .map(|_| {
            let (supervisor, spec) = (Arc::clone(&state.supervisor), spec.clone());
            tokio::task::spawn_blocking(move || supervisor.create(spec))
        })
        .collect();
    let mut forks = Vec::new();
    for handle in handles {
        let made = handle
            .await
            .map_err(|e| ApiError::internal(format!("a worker failed: {e}")))?;
        forks.push(match made {
            Ok(record) => Fork {
                sandbox: Some(Sandbox::from(&record)),
                error: None,
            },
            Err(e) => {
                let e = create_error(e);
                Fork {
                    sandbox: None,
                    error: Some(ErrorBody {
                        code: e.code.to_string(),
                        message: e.message,
                    }),
                }
            }
        });
    }
    Ok((StatusCode::CREATED, axum::Json(forks)))
}
