//! `/v1/groups`: the units quotas apply to.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::extract::{check_name, Json, Path};
use super::model::timestamp;
use crate::daemon::AppState;
use crate::store::{Quota, Store, Usage};

/// POST /v1/groups
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateGroup {
    #[schema(pattern = "^[a-z0-9][a-z0-9._-]{0,62}$")]
    pub name: String,
    #[serde(default)]
    pub quota: Quota,
}

/// A group: its quota and what its live sandboxes hold now.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Group {
    pub name: String,
    pub quota: Quota,
    pub usage: Usage,
    pub created_at: String,
}

fn view(store: &Store, name: &str) -> Result<Group, ApiError> {
    let group = store.group(name)?;
    Ok(Group {
        usage: store.group_usage(name)?,
        name: group.name,
        quota: group.quota,
        created_at: timestamp(group.created_at),
    })
}

/// Create a group.
#[utoipa::path(
    post, path = "/v1/groups", operation_id = "create_group", tag = "groups",
    request_body = CreateGroup,
    responses(
        (status = 201, description = "Created", body = Group),
        (status = 400, description = "Bad name", body = ErrorBody),
        (status = 409, description = "It exists", body = ErrorBody),
    )
)]
pub async fn create(
    State(state): State<Arc<AppState>>,
    Json(body): Json<CreateGroup>,
) -> Result<impl IntoResponse, ApiError> {
    check_name("group", &body.name)?;
    body.quota.check().map_err(ApiError::bad_request)?;
    let mut store = state.supervisor.store();
    store.create_group(&body.name, &body.quota)?;
    Ok((StatusCode::CREATED, axum::Json(view(&store, &body.name)?)))
}

/// List groups.
#[utoipa::path(
    get, path = "/v1/groups", operation_id = "list_groups", tag = "groups",
    responses((status = 200, description = "Every group", body = [Group]))
)]
pub async fn list(State(state): State<Arc<AppState>>) -> Result<axum::Json<Vec<Group>>, ApiError> {
    let store = state.supervisor.store();
    let groups = store.groups()?;
    let views = groups
        .iter()
        .map(|g| view(&store, &g.name))
        .collect::<Result<_, _>>()?;
    Ok(axum::Json(views))
}

/// One group.
#[utoipa::path(
    get, path = "/v1/groups/{name}", operation_id = "get_group", tag = "groups",
    params(("name" = String, Path, description = "Group name")),
    responses(
        (status = 200, description = "The group", body = Group),
        (status = 404, description = "No such group", body = ErrorBody),
    )
)]
pub async fn get_one(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<axum::Json<Group>, ApiError> {
    Ok(axum::Json(view(&state.supervisor.store(), &name)?))
}

/// Replace a group's quota. Sandboxes already over it keep running; new
/// ones are refused until there is room.
#[utoipa::path(
    put, path = "/v1/groups/{name}/quota", operation_id = "set_group_quota", tag = "groups",
    params(("name" = String, Path, description = "Group name")),
    request_body = Quota,
    responses(
        (status = 200, description = "The group", body = Group),
        (status = 400, description = "Bad quota", body = ErrorBody),
        (status = 404, description = "No such group", body = ErrorBody),
    )
)]
pub async fn set_quota(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Json(quota): Json<Quota>,
) -> Result<axum::Json<Group>, ApiError> {
    let mut store = state.supervisor.store();
    store.group(&name)?;
    quota.check().map_err(ApiError::bad_request)?;
    store.set_quota(&name, &quota)?;
    Ok(axum::Json(view(&store, &name)?))
}

/// Delete a group with no live sandboxes.
#[utoipa::path(
    delete, path = "/v1/groups/{name}", operation_id = "delete_group", tag = "groups",
    params(("name" = String, Path, description = "Group name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such group", body = ErrorBody),
        (status = 409, description = "It has live sandboxes, or is the default group", body = ErrorBody),
    )
)]
pub async fn delete(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.supervisor.store().delete_group(&name)?;
    Ok(StatusCode::NO_CONTENT)
}
