//! `/v1/sandboxes`: create, list, inspect, relabel, set the timeout, end.

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::extract::{check_name, Json, Path, Query};
use super::model::{CreateSandbox, ListSandboxes, Sandbox};
use crate::daemon::supervisor::{CreateError, CreateSpec, LifecycleError, Origin};
use crate::daemon::AppState;
use crate::labels::{check_labels, Labels, Selector};
use crate::store::{now_ms, EndReason, SandboxState};

/// The default timeout, as E2B's: 5 minutes.
const DEFAULT_TIMEOUT_SECONDS: u64 = 300;
/// The longest timeout: 30 days.
const MAX_TIMEOUT_SECONDS: u64 = 30 * 24 * 3600;

fn end_at(timeout_seconds: u64) -> Result<Option<i64>, ApiError> {
    if timeout_seconds > MAX_TIMEOUT_SECONDS {
        return Err(ApiError::bad_request(format!(
            "timeout_seconds must be at most {MAX_TIMEOUT_SECONDS} (30 days), or 0 for none"
        )));
    }
    Ok((timeout_seconds > 0).then(|| now_ms() + timeout_seconds as i64 * 1000))
}

/// A file on the daemon's host a request names: a relative path is bad
/// input (400); no regular file there is a 404 (`file_not_found`).
fn host_file(what: &str, path: &str) -> Result<PathBuf, ApiError> {
    let p = PathBuf::from(path);
    if !p.is_absolute() {
        return Err(ApiError::bad_request(format!(
            "{what} {path:?} must be an absolute path on the daemon's host"
        )));
    }
    let missing = |why: String| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "file_not_found",
            format!("{what} {path:?}: {why}"),
        )
    };
    match std::fs::metadata(&p) {
        Ok(m) if m.is_file() => Ok(p),
        Ok(_) => Err(missing("not a regular file".into())),
        Err(e) => Err(missing(e.to_string())),
    }
}

/// The kernel, initramfs and root filesystem a request names, each
/// checked ([`host_file`]); the daemon's kernel and initramfs where it
/// names none.
pub(super) fn boot_files(
    state: &AppState,
    kernel: &Option<String>,
    initramfs: &Option<String>,
    rootfs: &Option<String>,
) -> Result<(PathBuf, PathBuf, Option<PathBuf>), ApiError> {
    let kernel = match kernel {
        Some(k) => host_file("kernel", k)?,
        None => state.kernel.clone(),
    };
    let initramfs = match initramfs {
        Some(i) => host_file("initramfs", i)?,
        None => state.initramfs.clone(),
    };
    let rootfs = rootfs
        .as_deref()
        .map(|r| host_file("rootfs", r))
        .transpose()?;
    Ok((kernel, initramfs, rootfs))
}

impl CreateSandbox {
    /// The vCPUs and memory asked for, checked.
    pub(super) fn size(&self) -> Result<(u8, u32), ApiError> {
        let cpus = self.cpus.unwrap_or(1);
        if cpus == 0 || cpus > u32::from(vmm::layout::MAX_VCPUS) {
            return Err(ApiError::bad_request(format!(
                "cpus must be 1 to {}",
                vmm::layout::MAX_VCPUS
            )));
        }
        let memory_mib = self.memory_mib.unwrap_or(256);
        if !(32..=vmm::layout::MAX_MEMORY_MIB).contains(&u64::from(memory_mib)) {
            return Err(ApiError::bad_request(format!(
                "memory_mib must be 32 to {}",
                vmm::layout::MAX_MEMORY_MIB
            )));
        }
        Ok((cpus as u8, memory_mib))
    }

    pub(super) fn spec(&self, state: &AppState) -> Result<CreateSpec, ApiError> {
        if let Some(name) = &self.template {
            return self.template_spec(state, name);
        }
        let (cpus, memory_mib) = self.size()?;
        let (kernel, initramfs, rootfs) =
            boot_files(state, &self.kernel, &self.initramfs, &self.rootfs)?;
        self.common(
            state,
            Origin::Boot {
                kernel,
                initramfs,
                rootfs,
            },
            cpus,
            memory_mib,
            serde_json::json!({ "rootfs": self.rootfs }),
        )
    }

    fn template_spec(&self, state: &AppState, name: &str) -> Result<CreateSpec, ApiError> {
        // An unknown template is a 404 whatever else the body says.
        let template = state.supervisor.store().template(name)?;
        if self.rootfs.is_some()
            || self.kernel.is_some()
            || self.initramfs.is_some()
            || self.cpus.is_some()
            || self.memory_mib.is_some()
        {
            return Err(ApiError::bad_request(
                "a template sets the root filesystem, kernel, vCPUs and memory: give only the template",
            ));
        }
        self.common(
            state,
            Origin::Template(name.to_string()),
            template.cpus as u8,
            template.memory_mib,
            serde_json::json!({ "template": name }),
        )
    }

    /// What every create checks and carries, whatever it is made from.
    fn common(
        &self,
        state: &AppState,
        origin: Origin,
        cpus: u8,
        memory_mib: u32,
        source: serde_json::Value,
    ) -> Result<CreateSpec, ApiError> {
        let group = self.group.clone().unwrap_or_else(|| "default".into());
        check_name("group", &group)?;
        check_labels(&self.labels).map_err(|e| ApiError::bad_request(e.to_string()))?;
        super::exec::check_env(&self.env)?;
        {
            let store = state.supervisor.store();
            store.group(&group)?;
            // A name that could not be a secret's is one that does not exist.
            for name in &self.secrets {
                store.secret(&group, name)?;
            }
        }
        Ok(CreateSpec {
            origin,
            cpus,
            memory_mib,
            group,
            labels: self.labels.clone(),
            end_at: end_at(self.timeout_seconds.unwrap_or(DEFAULT_TIMEOUT_SECONDS))?,
            source,
            secrets: self.secrets.clone(),
            env: self.env.clone(),
            idle_suspend_ms: match self.idle_suspend_seconds {
                None => None,
                Some(s) if (1..=MAX_TIMEOUT_SECONDS).contains(&s) => Some(s as i64 * 1000),
                Some(_) => {
                    return Err(ApiError::bad_request(format!(
                        "idle_suspend_seconds must be 1 to {MAX_TIMEOUT_SECONDS}"
                    )))
                }
            },
        })
    }
}

/// Runs blocking work (a boot, a kill) off the async threads.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("a worker failed: {e}")))
}

/// Create a sandbox and wait until it takes commands.
#[utoipa::path(
    post, path = "/v1/sandboxes", operation_id = "create_sandbox", tag = "sandboxes",
    request_body = CreateSandbox,
    responses(
        (status = 201, description = "Running", body = Sandbox),
        (status = 400, description = "Bad input", body = ErrorBody),
        (status = 404, description = "No such group, secret, template or file", body = ErrorBody),
        (status = 429, description = "The group's quota, or the host's limit, is reached", body = ErrorBody),
        (status = 500, description = "The sandbox could not be started", body = ErrorBody),
    )
)]
pub async fn create(
    State(state): State<Arc<AppState>>,
    Json(body): Json<CreateSandbox>,
) -> Result<impl IntoResponse, ApiError> {
    let spec = body.spec(&state)?;
    let supervisor = Arc::clone(&state.supervisor);
    let record = blocking(move || supervisor.create(spec))
        .await?
        .map_err(create_error)?;
    Ok((StatusCode::CREATED, axum::Json(Sandbox::from(&record))))
}

/// List sandboxes, newest first.
#[utoipa::path(
    get, path = "/v1/sandboxes", operation_id = "list_sandboxes", tag = "sandboxes",
    params(ListSandboxes),
    responses(
        (status = 200, description = "The sandboxes that match", body = [Sandbox]),
        (status = 400, description = "Bad selector or state", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): State<Arc<AppState>>,
    Query(query): Query<ListSandboxes>,
) -> Result<axum::Json<Vec<Sandbox>>, ApiError> {
    let selector: Selector = query
        .label_selector
        .as_deref()
        .unwrap_or("")
        .parse()
        .map_err(|e: crate::labels::LabelError| ApiError::bad_request(e.to_string()))?;
    let states = match query.state.as_deref() {
        None | Some("") => vec![
            SandboxState::Creating,
            SandboxState::Running,
            SandboxState::Suspended,
        ],
        Some(list) => list
            .split(',')
            .map(|s| {
                s.trim().parse::<SandboxState>().map_err(|_| {
                    ApiError::bad_request(format!(
                        "state {s:?} is not one of creating, running, suspended, ended"
                    ))
                })
            })
            .collect::<Result<_, _>>()?,
    };
    let records = state.supervisor.store().sandboxes(&states)?;
    Ok(axum::Json(
        records
            .iter()
            .filter(|r| selector.matches(&r.labels))
            .map(Sandbox::from)
            .collect(),
    ))
}

/// One sandbox (an ended one too, with why it ended).
#[utoipa::path(
    get, path = "/v1/sandboxes/{id}", operation_id = "get_sandbox", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id")),
    responses(
        (status = 200, description = "The sandbox", body = Sandbox),
        (status = 404, description = "No such sandbox", body = ErrorBody),
    )
)]
pub async fn get_one(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<axum::Json<Sandbox>, ApiError> {
    let record = state.supervisor.store().sandbox(&id)?;
    Ok(axum::Json(Sandbox::from(&record)))
}

/// End a sandbox now: its VM stops and its disks go. Its record stays,
/// ended with reason `deleted`.
#[utoipa::path(
    delete, path = "/v1/sandboxes/{id}", operation_id = "delete_sandbox", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id")),
    responses(
        (status = 204, description = "Ended"),
        (status = 404, description = "No such sandbox", body = ErrorBody),
        (status = 409, description = "It has already ended", body = ErrorBody),
    )
)]
pub async fn delete(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let supervisor = Arc::clone(&state.supervisor);
    blocking(move || supervisor.destroy(&id, EndReason::Deleted, "")).await??;
    Ok(StatusCode::NO_CONTENT)
}

/// PATCH /v1/sandboxes/{id}
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchSandbox {
    /// The sandbox's labels, replacing all it had.
    pub labels: Option<Labels>,
}

/// Change a sandbox's labels.
#[utoipa::path(
    patch, path = "/v1/sandboxes/{id}", operation_id = "update_sandbox", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id")),
    request_body = PatchSandbox,
    responses(
        (status = 200, description = "The sandbox as it is now", body = Sandbox),
        (status = 400, description = "Bad labels", body = ErrorBody),
        (status = 404, description = "No such sandbox", body = ErrorBody),
        (status = 409, description = "It has ended", body = ErrorBody),
    )
)]
pub async fn patch(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Json(body): Json<PatchSandbox>,
) -> Result<axum::Json<Sandbox>, ApiError> {
    let mut store = state.supervisor.store();
    let mut record = store.sandbox(&id)?;
    if let Some(labels) = &body.labels {
        check_labels(labels).map_err(|e| ApiError::bad_request(e.to_string()))?;
        record = store.set_labels(&id, labels)?;
    }
    drop(store);
    state.supervisor.changed.notify_waiters();
    Ok(axum::Json(Sandbox::from(&record)))
}

/// POST /v1/sandboxes/{id}/timeout
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetTimeout {
    /// Seconds from now until it expires (0: never; at most 30 days).
    #[serde(deserialize_with = "crate::json_num::u64")]
    #[schema(minimum = 0, maximum = 2592000)]
    pub timeout_seconds: u64,
}

/// Set when a sandbox expires, counted from now. Reading a sandbox never
/// changes it; only this does.
#[utoipa::path(
    post, path = "/v1/sandboxes/{id}/timeout", operation_id = "set_sandbox_timeout", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id")),
    request_body = SetTimeout,
    responses(
        (status = 200, description = "The sandbox with its new end time", body = Sandbox),
        (status = 400, description = "Bad timeout", body = ErrorBody),
        (status = 404, description = "No such sandbox", body = ErrorBody),
        (status = 409, description = "It has ended", body = ErrorBody),
    )
)]
pub async fn set_timeout(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Json(body): Json<SetTimeout>,
) -> Result<axum::Json<Sandbox>, ApiError> {
    state.supervisor.store().sandbox(&id)?;
    let end_at = end_at(body.timeout_seconds)?;
    let record = state.supervisor.store().set_end_at(&id, end_at)?;
    state.supervisor.changed.notify_waiters();
    Ok(axum::Json(Sandbox::from(&record)))
}

pub(super) fn lifecycle(e: LifecycleError, code: &'static str) -> ApiError {
    match e {
        LifecycleError::Store(e) => e.into(),
        LifecycleError::Failed(m) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, code, m),
    }
}

/// Suspend a running sandbox to disk: its memory and disks are kept, its
/// VMM process goes. Commands are refused until it is resumed.
#[utoipa::path(
    post, path = "/v1/sandboxes/{id}/suspend", tag = "sandboxes", operation_id = "suspend_sandbox",
    params(("id" = String, Path, description = "Sandbox id")),
    responses(
        (status = 200, description = "Suspended", body = Sandbox),
        (status = 404, description = "No such sandbox", body = ErrorBody),
        (status = 409, description = "It is not running", body = ErrorBody),
        (status = 500, description = "It could not be suspended (it carries on running)", body = ErrorBody),
    )
)]
pub async fn suspend(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<axum::Json<Sandbox>, ApiError> {
    let supervisor = Arc::clone(&state.supervisor);
    let record = blocking(move || supervisor.suspend(&id))
        .await?
        .map_err(|e| lifecycle(e, "suspend_failed"))?;
    Ok(axum::Json(Sandbox::from(&record)))
}

/// Resume a suspended sandbox where it was: the same id, memory and files.
#[utoipa::path(
    post, path = "/v1/sandboxes/{id}/resume", tag = "sandboxes", operation_id = "resume_sandbox",
    params(("id" = String, Path, description = "Sandbox id")),
    responses(
        (status = 200, description = "Running again", body = Sandbox),
        (status = 404, description = "No such sandbox", body = ErrorBody),
        (status = 409, description = "It is not suspended", body = ErrorBody),
        (status = 500, description = "It could not be resumed (it stays suspended)", body = ErrorBody),
    )
)]
pub async fn resume(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<axum::Json<Sandbox>, ApiError> {
    let supervisor = Arc::clone(&state.supervisor);
    let record = blocking(move || supervisor.resume(&id))
        .await?
        .map_err(|e| lifecycle(e, "resume_failed"))?;
    Ok(axum::Json(Sandbox::from(&record)))
}

pub(super) fn create_error(e: CreateError) -> ApiError {
    match e {
        CreateError::Store(e) => e.into(),
        CreateError::Boot { .. } => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "sandbox_failed",
            e.to_string(),
        ),
        CreateError::Other(e) => ApiError::internal(format!("{e:#}")),
    }
}
