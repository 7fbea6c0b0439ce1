//! Bearer tokens for the TCP listeners (`capsule serve --listen`,
//! `capsule mcp --http`): the token lives in a file only its owner can
//! read, and every request must carry it.

use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;

use crate::api::error::ApiError;

/// Wraps `router` so that a request without `Authorization: Bearer
/// <token>` gets 401 `unauthorized` and reaches nothing.
pub fn guard(router: Router, token: String) -> Router {
    let token = Arc::new(token);
    router.layer(axum::middleware::from_fn(move |req, next| {
        let token = Arc::clone(&token);
        async move { require(&token, req, next).await }
    }))
}

async fn require(token: &str, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Compared in constant time: the token is a secret.
    let ok = given.is_some_and(|g| {
        g.len() == token.len()
            && g.bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    if ok {
        next.run(req).await
    } else {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this listener needs Authorization: Bearer <token>",
        )
        .into_response()
    }
}

/// The token in `path`, or a fresh one written there (0600) if it is
/// missing or empty. A file other users could read or write is refused:
/// its token is no secret.
pub fn read_or_make(path: &Path) -> Result<String> {
    match std::fs::File::open(path) {
        Ok(mut file) => {
            // The mode of the file read, not of whatever is at the path
            // after: one open, checked through its handle.
            let mode = file.metadata()?.mode();
            let mut text = String::new();
            std::io::Read::read_to_string(&mut file, &mut text)
                .with_context(|| format!("reading {}", path.display()))?;
            if text.trim().is_empty() {
                std::fs::remove_file(path)
                    .with_context(|| format!("replacing the empty {}", path.display()))?;
            } else if mode & 0o077 != 0 {
                bail!(
                    "{} is readable or writable by other users (mode {:o}); \
                     `chmod 600` it or name a new file",
                    path.display(),
                    mode & 0o777
                );
            } else {
                return Ok(text.trim().to_string());
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let token = crate::daemon::supervisor::random_word(32)?;
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(f, "{token}")?;
    Ok(token)
}
