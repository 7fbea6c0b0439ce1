//! What sandboxes use (`/v1/sandboxes/{id}/stats`) and the daemon's
//! Prometheus metrics (`/metrics`).

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::extract::Path;
use super::sandboxes::blocking;
use crate::daemon::stats::SandboxUsage;
use crate::daemon::AppState;
use crate::store::SandboxState;

/// What a sandbox uses of the host now, measured by the host (not
/// reported by the guest). The process figures are null unless it is
/// running.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxStats {
    pub id: String,
    pub state: SandboxState,
    pub cpus: u32,
    /// Guest memory it was given, in bytes.
    pub memory_limit_bytes: u64,
    /// Seconds since its VM last started (its create or its last resume).
    pub uptime_seconds: Option<f64>,
    /// CPU time its VMM process has used (user and system, vCPUs
    /// included), in seconds, since it last started.
    pub cpu_seconds: Option<f64>,
    /// Host memory resident for it (guest memory the guest has touched,
    /// and the VMM's own), in bytes.
    pub memory_bytes: Option<u64>,
    /// Its proportional share of `memory_bytes`: memory shared with other
    /// sandboxes (forks of one snapshot) counts for a fraction.
    pub memory_pss_bytes: Option<u64>,
    /// Host disk its files take (its disks' writes, suspended state), in
    /// bytes.
    pub disk_bytes: u64,
}

impl From<SandboxUsage> for SandboxStats {
    fn from(u: SandboxUsage) -> Self {
        let r = &u.record;
        SandboxStats {
            id: r.id.clone(),
            state: r.state,
            cpus: r.cpus,
            memory_limit_bytes: u64::from(r.memory_mib) << 20,
            uptime_seconds: u.process.map(|p| round_ms(p.uptime_seconds)),
            cpu_seconds: u.process.map(|p| round_ms(p.cpu_seconds)),
            memory_bytes: u.process.map(|p| p.memory_bytes),
            memory_pss_bytes: u.process.map(|p| p.memory_pss_bytes),
            disk_bytes: u.disk_bytes,
        }
    }
}

/// To the millisecond: finer is noise.
fn round_ms(seconds: f64) -> f64 {
    (seconds * 1000.0).round() / 1000.0
}

/// What a sandbox uses of the host now: CPU time, memory, disk, uptime.
#[utoipa::path(
    get, path = "/v1/sandboxes/{id}/stats", operation_id = "sandbox_stats", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id")),
    responses(
        (status = 200, description = "Its usage", body = SandboxStats),
        (status = 404, description = "No such sandbox", body = ErrorBody),
    )
)]
pub async fn sandbox_stats(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<axum::Json<SandboxStats>, ApiError> {
    let supervisor = Arc::clone(&state.supervisor);
    let usage = blocking(move || supervisor.usage(&id)).await??;
    Ok(axum::Json(usage.into()))
}

/// The daemon's metrics for Prometheus (OpenMetrics text): sandboxes by
/// state and by why they ended, create, suspend and resume latency
/// histograms, and each pool's ready and target sizes.
#[utoipa::path(
    get, path = "/metrics", operation_id = "metrics", tag = "daemon",
    responses(
        (status = 200, description = "The metrics", content_type = "application/openmetrics-text", body = String),
    )
)]
pub async fn metrics(State(state): State<Arc<AppState>>) -> Result<impl IntoResponse, ApiError> {
    let supervisor = Arc::clone(&state.supervisor);
    let text = blocking(move || supervisor.render_metrics())
        .await?
        .map_err(|e| ApiError::internal(format!("{e:#}")))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    ))
}
