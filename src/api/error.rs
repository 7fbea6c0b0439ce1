//! Errors as the API returns them: an HTTP status, a stable machine code a
//! client can branch on, and a message for a person.
//!
//! ```json
//! {"code": "sandbox_not_found", "message": "no sandbox \"sb-x\""}
//! ```

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::store::StoreError;

/// The body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Stable, machine-readable: `bad_request`, `not_found`,
    /// `sandbox_not_found`, `conflict`, `quota_exceeded`, `internal`, ...
    pub code: String,
    /// What went wrong, for a person.
    pub message: String,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::CONFLICT, "conflict", message)
    }

    /// The same error under a more specific code.
    pub fn with_code(self, code: &'static str) -> Self {
        ApiError { code, ..self }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let message = e.to_string();
        match e {
            StoreError::NotFound { kind, .. } => {
                let code = match kind {
                    "sandbox" => "sandbox_not_found",
                    "group" => "group_not_found",
                    "secret" => "secret_not_found",
                    "template" => "template_not_found",
                    "pool" => "pool_not_found",
                    "port" => "port_not_found",
                    _ => "not_found",
                };
                ApiError::new(StatusCode::NOT_FOUND, code, message)
            }
            StoreError::Conflict(_) => ApiError::conflict(message),
            StoreError::QuotaExceeded { .. } => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "quota_exceeded", message)
            }
            StoreError::HostFull { .. } => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "host_full", message)
            }
            StoreError::Sqlite(_) | StoreError::TooNew { .. } | StoreError::Corrupt { .. } => {
                tracing::error!("{message}");
                ApiError::internal(message)
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            code: self.code.to_string(),
            message: self.message,
        };
        (self.status, Json(body)).into_response()
    }
}
