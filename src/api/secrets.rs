//! `/v1/groups/{name}/secrets`: set, list (names only) and delete a
//! group's secrets. A value goes in and is never given back.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::extract::{Json, Path};
use super::model::timestamp;
use crate::daemon::AppState;
use crate::secrets::MAX_SECRET_BYTES;

/// The longest value in characters (the schema's `maxLength`).
const MAX_SECRET_CHARS: usize = 16384;

/// A secret's name is the environment variable commands get it as.
pub fn check_secret_name(name: &str) -> Result<(), ApiError> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "secret name {name:?} is not valid: an environment variable name (letters, digits \
             and '_', not starting with a digit, at most 128)"
        )))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetSecret {
    /// The value, at most 16384 characters (and 64 KiB); never shown again.
    #[schema(max_length = 16384)]
    pub value: String,
}

/// A secret as the API shows it: its name and dates, never its value.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Secret {
    pub name: String,
    pub created_at: String,
    pub updated_at: String,
}

/// The path of one secret.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub struct SecretPath {
    /// Group name.
    pub name: String,
    /// Secret name: the environment variable commands get it as.
    #[param(pattern = "^[A-Za-z_][A-Za-z0-9_]{0,127}$")]
    pub secret: String,
}

/// Set a secret (or replace its value).
#[utoipa::path(
    put, path = "/v1/groups/{name}/secrets/{secret}", tag = "groups", operation_id = "set_secret",
    params(SecretPath),
    request_body = SetSecret,
    responses(
        (status = 204, description = "Set"),
        (status = 400, description = "Bad name or value", body = ErrorBody),
        (status = 404, description = "No such group", body = ErrorBody),
    )
)]
pub async fn set(
    State(state): State<Arc<AppState>>,
    Path(SecretPath {
        name: group,
        secret: name,
    }): Path<SecretPath>,
    Json(body): Json<SetSecret>,
) -> Result<StatusCode, ApiError> {
    state.supervisor.store().group(&group)?;
    check_secret_name(&name)?;
    if body.value.len() > MAX_SECRET_BYTES
        || body.value.chars().count() > MAX_SECRET_CHARS
        || body.value.contains('\0')
    {
        return Err(ApiError::bad_request(format!(
            "a secret's value is at most {MAX_SECRET_BYTES} bytes, with no NUL"
        )));
    }
    let sealed = state
        .sealer
        .seal(&group, &name, body.value.as_bytes())
        .map_err(|e| ApiError::internal(e.to_string()))?;
    state
        .supervisor
        .store()
        .put_secret(&group, &name, &sealed)?;
    Ok(StatusCode::NO_CONTENT)
}

/// A group's secrets: names and dates only.
#[utoipa::path(
    get, path = "/v1/groups/{name}/secrets", tag = "groups", operation_id = "list_secrets",
    params(("name" = String, Path, description = "Group name")),
    responses(
        (status = 200, description = "Its secrets, without values", body = [Secret]),
        (status = 404, description = "No such group", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): State<Arc<AppState>>,
    Path(group): Path<String>,
) -> Result<axum::Json<Vec<Secret>>, ApiError> {
    let listed = state.supervisor.store().secrets(&group)?;
    Ok(axum::Json(
        listed
            .into_iter()
            .map(|s| Secret {
                name: s.name,
                created_at: timestamp(s.created_at),
                updated_at: timestamp(s.updated_at),
            })
            .collect(),
    ))
}

/// Delete a secret. Sandboxes given it fail their next command with a
/// conflict naming it.
#[utoipa::path(
    delete, path = "/v1/groups/{name}/secrets/{secret}", tag = "groups", operation_id = "delete_secret",
    params(SecretPath),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such secret", body = ErrorBody),
    )
)]
pub async fn delete(
    State(state): State<Arc<AppState>>,
    Path(SecretPath {
        name: group,
        secret: name,
    }): Path<SecretPath>,
) -> Result<StatusCode, ApiError> {
    state.supervisor.store().delete_secret(&group, &name)?;
    Ok(StatusCode::NO_CONTENT)
}

/// The environment a sandbox's secrets give its commands, opened now.
pub fn environment(
    state: &AppState,
    group: &str,
    names: &[String],
) -> Result<Vec<(String, zeroize::Zeroizing<String>)>, ApiError> {
    let store = state.supervisor.store();
    names
        .iter()
        .map(|name| {
            let sealed = store.secret(group, name).map_err(|_| {
                ApiError::conflict(format!(
                    "this sandbox's secret {name} no longer exists in group {group}"
                ))
            })?;
            let value = state
                .sealer
                .open(group, name, &sealed)
                .map_err(|e| ApiError::internal(e.to_string()))?;
            let text = String::from_utf8(value.to_vec())
                .map_err(|_| ApiError::internal(format!("secret {name} is not text")))?;
            Ok((name.clone(), zeroize::Zeroizing::new(text)))
        })
        .collect()
}
