//! `/v1/pools`: keep restored sandboxes of a template ready, so creating
//! one from it takes milliseconds (the pool refills in the background).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::extract::{Json, Path};
use crate::daemon::pool::PoolStatus;
use crate::daemon::AppState;
use crate::store::MAX_WARM;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetPool {
    /// How many to keep ready, 0 to 64.
    #[serde(deserialize_with = "crate::json_num::u32")]
    #[schema(minimum = 0, maximum = 64)]
    pub warm: u32,
}

/// Keep `warm` sandboxes of a template ready.
#[utoipa::path(
    put, path = "/v1/pools/{template}", tag = "templates", operation_id = "set_pool",
    params(("template" = String, Path, description = "Template name")),
    request_body = SetPool,
    responses(
        (status = 200, description = "The pool (it fills in the background)", body = PoolStatus),
        (status = 400, description = "Bad size", body = ErrorBody),
        (status = 404, description = "No such template", body = ErrorBody),
    )
)]
pub async fn set(
    State(state): State<Arc<AppState>>,
    Path(template): Path<String>,
    Json(body): Json<SetPool>,
) -> Result<axum::Json<PoolStatus>, ApiError> {
    state.supervisor.store().template(&template)?;
    if body.warm > MAX_WARM {
        return Err(ApiError::bad_request(format!(
            "warm must be 0 to {MAX_WARM}"
        )));
    }
    // Shrinking a pool stops VMs: off the async threads.
    let supervisor = Arc::clone(&state.supervisor);
    let status =
        super::sandboxes::blocking(move || supervisor.set_pool(&template, body.warm)).await??;
    Ok(axum::Json(status))
}

/// Every pool, with how many are ready now.
#[utoipa::path(
    get, path = "/v1/pools", tag = "templates", operation_id = "list_pools",
    responses((status = 200, description = "The pools", body = [PoolStatus]))
)]
pub async fn list(State(state): State<Arc<AppState>>) -> axum::Json<Vec<PoolStatus>> {
    axum::Json(state.supervisor.pools())
}

/// Stop keeping sandboxes of a template ready; the ready ones stop.
#[utoipa::path(
    delete, path = "/v1/pools/{template}", tag = "templates", operation_id = "delete_pool",
    params(("template" = String, Path, description = "Template name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such pool", body = ErrorBody),
    )
)]
pub async fn delete(
    State(state): State<Arc<AppState>>,
    Path(template): Path<String>,
) -> Result<StatusCode, ApiError> {
    let supervisor = Arc::clone(&state.supervisor);
    super::sandboxes::blocking(move || supervisor.delete_pool(&template)).await??;
    Ok(StatusCode::NO_CONTENT)
}
