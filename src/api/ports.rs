//! `/v1/sandboxes/{id}/ports`: guest TCP ports exposed on the host's
//! loopback. Each connection to the host address is carried over the
//! agent to the guest's loopback port; no guest network device is
//! involved. An exposure is kept while the sandbox is suspended (its
//! listener closed) and opened again on resume; it goes when the sandbox
//! ends.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::extract::{Json, Path};
use super::sandboxes::{blocking, lifecycle};
use crate::daemon::AppState;
use crate::store::PortRecord;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExposePort {
    /// The TCP port on the guest's loopback (1 to 65535).
    #[serde(deserialize_with = "crate::json_num::u32")]
    #[schema(minimum = 1, maximum = 65535)]
    pub port: u32,
}

/// An exposed port.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PortView {
    /// The guest's port.
    pub port: u16,
    /// Where the host reaches it: `127.0.0.1:<host_port>`.
    pub address: String,
    pub host_port: u16,
    /// Its HTTP preview through the daemon's gateway
    /// (`http://<port>-<id>.<domain>:<gateway port>/`), if the daemon
    /// serves one (`capsule serve --gateway`).
    pub preview_url: Option<String>,
    /// Unix milliseconds.
    pub created_at: i64,
}

impl PortView {
    fn new(state: &AppState, id: &str, r: &PortRecord) -> Self {
        PortView {
            port: r.port,
            address: format!("127.0.0.1:{}", r.host_port),
            host_port: r.host_port,
            preview_url: state.gateway.as_ref().map(|g| g.url(id, r.port)),
            created_at: r.created_at,
        }
    }
}

fn guest_port(port: u32) -> Result<u16, ApiError> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| ApiError::bad_request(format!("port {port} is not 1 to 65535")))
}

/// Expose a guest port on the host's loopback.
#[utoipa::path(
    post, path = "/v1/sandboxes/{id}/ports", operation_id = "expose_port", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id")),
    request_body = ExposePort,
    responses(
        (status = 201, description = "Exposed (or already was)", body = PortView),
        (status = 400, description = "Not a port", body = ErrorBody),
        (status = 404, description = "No such sandbox", body = ErrorBody),
        (status = 409, description = "It is not running", body = ErrorBody),
        (status = 500, description = "The host could not listen", body = ErrorBody),
    )
)]
pub async fn expose(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Json(body): Json<ExposePort>,
) -> Result<(StatusCode, axum::Json<PortView>), ApiError> {
    state.supervisor.store().sandbox(&id)?;
    let port = guest_port(body.port)?;
    let supervisor = Arc::clone(&state.supervisor);
    let sandbox = id.clone();
    let record = blocking(move || supervisor.expose_port(&sandbox, port))
        .await?
        .map_err(|e| lifecycle(e, "expose_failed"))?;
    Ok((
        StatusCode::CREATED,
        axum::Json(PortView::new(&state, &id, &record)),
    ))
}

/// The sandbox's exposed ports.
#[utoipa::path(
    get, path = "/v1/sandboxes/{id}/ports", operation_id = "list_ports", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id")),
    responses(
        (status = 200, description = "Its exposed ports, in port order", body = [PortView]),
        (status = 404, description = "No such sandbox", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<axum::Json<Vec<PortView>>, ApiError> {
    let ports = {
        let store = state.supervisor.store();
        store.sandbox(&id)?;
        store.ports(&id)?
    };
    Ok(axum::Json(
        ports
            .iter()
            .map(|r| PortView::new(&state, &id, r))
            .collect(),
    ))
}

/// Stop exposing a guest port (connections under way go on).
#[utoipa::path(
    delete, path = "/v1/sandboxes/{id}/ports/{port}", operation_id = "unexpose_port", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id"), ("port" = u32, Path, description = "The guest's port")),
    responses(
        (status = 204, description = "No longer exposed"),
        (status = 400, description = "Not a port", body = ErrorBody),
        (status = 404, description = "No such sandbox, or the port is not exposed", body = ErrorBody),
    )
)]
pub async fn unexpose(
    State(state): State<Arc<AppState>>,
    Path((id, port)): Path<(String, u32)>,
) -> Result<StatusCode, ApiError> {
    state.supervisor.store().sandbox(&id)?;
    let port = guest_port(port)?;
    let supervisor = Arc::clone(&state.supervisor);
    blocking(move || supervisor.unexpose_port(&id, port))
        .await?
        .map_err(|e| lifecycle(e, "unexpose_failed"))?;
    Ok(StatusCode::NO_CONTENT)
}
