//! The HTTP API: every resource under `/v1`, errors as JSON with a stable
//! code, and the OpenAPI document generated from these handlers
//! (`/openapi.json`; checked in as `docs/openapi.json`).

mod commands;
pub mod error;
mod events;
pub mod exec;
mod extract;
pub mod files;
mod groups;
pub mod model;
mod pools;
pub mod ports;
pub mod processes;
mod sandboxes;
mod secrets;
pub mod stats;
mod templates;
pub mod terminal;

use std::sync::Arc;

use axum::routing::{delete, get, post, put};
use axum::Router;
use utoipa::OpenApi;

use crate::daemon::AppState;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Capsule",
        description = "Isolated, on-demand KVM microVM sandboxes. Errors are JSON \
                       (`{\"code\": ..., \"message\": ...}`) with a stable code.",
        version = "1"
    ),
    paths(
        sandboxes::create,
        sandboxes::list,
        sandboxes::get_one,
        sandboxes::delete,
        sandboxes::patch,
        sandboxes::set_timeout,
        sandboxes::suspend,
        sandboxes::resume,
        stats::sandbox_stats,
        templates::snapshot,
        exec::exec,
        terminal::pty,
        ports::expose,
        ports::list,
        ports::unexpose,
        commands::list,
        commands::signal,
        commands::stdin,
        files::read,
        files::write,
        files::remove,
        files::stat,
        files::list,
        files::mkdir,
        files::rename,
        files::read_tree,
        files::write_tree,
        files::watch,
        processes::start,
        processes::list,
        processes::get_one,
        processes::signal,
        processes::logs,
        groups::create,
        groups::list,
        groups::get_one,
        groups::set_quota,
        groups::delete,
        secrets::set,
        secrets::list,
        secrets::delete,
        templates::create,
        templates::list,
        templates::get_one,
        templates::delete,
        templates::fork,
        pools::set,
        pools::list,
        pools::delete,
        events::list,
        events::stream,
        stats::metrics,
    ),
    // The WebSocket's messages, which no path's body names.
    components(schemas(terminal::PtyStart, terminal::PtyControl, terminal::PtyEvent)),
    tags(
        (name = "sandboxes", description = "Sandboxes: create, inspect, run commands, end"),
        (name = "files", description = "Files in a sandbox: streamed upload and download, stat, list, mkdir, remove, rename"),
        (name = "processes", description = "Detached processes: they outlive the request that started them; their output is read from any offset"),
        (name = "groups", description = "Groups: their quotas and secrets"),
        (name = "templates", description = "Primed snapshots to create and fork sandboxes from"),
        (name = "events", description = "What happened to sandboxes, in order"),
        (name = "daemon", description = "The daemon itself")
    )
)]
pub struct ApiDoc;

/// The OpenAPI document, pretty-printed (as checked in).
pub fn openapi_json() -> String {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("the OpenAPI document serializes");
    describe_maps(&mut doc);
    let mut text = serde_json::to_string_pretty(&doc).expect("the OpenAPI document serializes");
    text.push('\n');
    text
}

/// What utoipa cannot say of a map's keys: labels follow the label rules
/// (`crate::labels`), environment names have no `=`.
fn describe_maps(doc: &mut serde_json::Value) {
    const LABEL_KEY: &str = r"^(([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.){0,3}[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?/)?[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$";
    const LABEL_VALUE: &str = r"^([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?$";
    let Some(schemas) = doc
        .pointer_mut("/components/schemas")
        .and_then(|s| s.as_object_mut())
    else {
        return;
    };
    for schema in schemas.values_mut() {
        let Some(props) = schema.get_mut("properties").and_then(|p| p.as_object_mut()) else {
            continue;
        };
        for (name, prop) in props.iter_mut() {
            let Some(prop) = prop.as_object_mut() else {
                continue;
            };
            let is_object = match prop.get("type") {
                Some(serde_json::Value::String(t)) => t == "object",
                Some(serde_json::Value::Array(ts)) => ts.iter().any(|t| t == "object"),
                _ => false,
            };
            if !is_object {
                continue;
            }
            match name.as_str() {
                "labels" => {
                    prop.insert(
                        "propertyNames".into(),
                        serde_json::json!({ "pattern": LABEL_KEY }),
                    );
                    prop.insert(
                        "additionalProperties".into(),
                        serde_json::json!({ "type": "string", "pattern": LABEL_VALUE }),
                    );
                    prop.insert("maxProperties".into(), crate::labels::MAX_LABELS.into());
                }
                "env" => {
                    prop.insert(
                        "propertyNames".into(),
                        serde_json::json!({ "pattern": "^[^=\\u0000]{1,256}$" }),
                    );
                    prop.insert(
                        "additionalProperties".into(),
                        serde_json::json!({ "type": "string", "pattern": "^[^\\u0000]*$", "maxLength": 32768 }),
                    );
                    prop.insert("maxProperties".into(), 256.into());
                }
                _ => {}
            }
        }
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route(
            "/v1/sandboxes",
            post(sandboxes::create).get(sandboxes::list),
        )
        .route(
            "/v1/sandboxes/{id}",
            get(sandboxes::get_one)
                .delete(sandboxes::delete)
                .patch(sandboxes::patch),
        )
        .route("/v1/sandboxes/{id}/timeout", post(sandboxes::set_timeout))
        .route("/v1/sandboxes/{id}/exec", post(exec::exec))
        .route("/v1/sandboxes/{id}/pty", get(terminal::pty))
        .route(
            "/v1/sandboxes/{id}/ports",
            post(ports::expose).get(ports::list),
        )
        .route("/v1/sandboxes/{id}/ports/{port}", delete(ports::unexpose))
        .route("/v1/sandboxes/{id}/commands", get(commands::list))
        .route(
            "/v1/sandboxes/{id}/commands/{pid}/signal",
            post(commands::signal),
        )
        .route(
            "/v1/sandboxes/{id}/commands/{pid}/stdin",
            post(commands::stdin),
        )
        .route(
            "/v1/sandboxes/{id}/files",
            get(files::read).put(files::write).delete(files::remove),
        )
        .route("/v1/sandboxes/{id}/files/stat", get(files::stat))
        .route("/v1/sandboxes/{id}/files/list", get(files::list))
        .route("/v1/sandboxes/{id}/files/mkdir", post(files::mkdir))
        .route("/v1/sandboxes/{id}/files/rename", post(files::rename))
        .route("/v1/sandboxes/{id}/files/watch", get(files::watch))
        .route(
            "/v1/sandboxes/{id}/processes",
            post(processes::start).get(processes::list),
        )
        .route(
            "/v1/sandboxes/{id}/processes/{pid}",
            get(processes::get_one),
        )
        .route(
            "/v1/sandboxes/{id}/processes/{pid}/signal",
            post(processes::signal),
        )
        .route(
            "/v1/sandboxes/{id}/processes/{pid}/logs",
            get(processes::logs),
        )
        .route(
            "/v1/sandboxes/{id}/files/archive",
            get(files::read_tree).put(files::write_tree),
        )
        .route("/v1/sandboxes/{id}/suspend", post(sandboxes::suspend))
        .route("/v1/sandboxes/{id}/resume", post(sandboxes::resume))
        .route("/v1/sandboxes/{id}/snapshot", post(templates::snapshot))
        .route("/v1/sandboxes/{id}/stats", get(stats::sandbox_stats))
        .route(
            "/v1/templates",
            post(templates::create).get(templates::list),
        )
        .route(
            "/v1/templates/{name}",
            get(templates::get_one).delete(templates::delete),
        )
        .route("/v1/templates/{name}/fork", post(templates::fork))
        .route("/v1/pools", get(pools::list))
        .route(
            "/v1/pools/{template}",
            put(pools::set).delete(pools::delete),
        )
        .route("/v1/groups", post(groups::create).get(groups::list))
        .route(
            "/v1/groups/{name}",
            get(groups::get_one).delete(groups::delete),
        )
        .route("/v1/groups/{name}/quota", put(groups::set_quota))
        .route("/v1/groups/{name}/secrets", get(secrets::list))
        .route(
            "/v1/groups/{name}/secrets/{secret}",
            put(secrets::set).delete(secrets::delete),
        )
        .route("/v1/events", get(events::list))
        .route("/v1/events/stream", get(events::stream))
        .route("/metrics", get(stats::metrics))
        .route("/openapi.json", get(|| async { openapi_json() }))
        .fallback(|| async {
            error::ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint (see /openapi.json)",
            )
        })
        .with_state(state)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_checked_in_openapi_document_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json");
        let current = super::openapi_json();
        if std::env::var_os("CAPSULE_WRITE_OPENAPI").is_some() {
            std::fs::write(path, &current).unwrap();
        }
        let checked_in = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            checked_in == current,
            "docs/openapi.json is stale: run CAPSULE_WRITE_OPENAPI=1 cargo test -p capsule \
             the_checked_in_openapi_document_is_current, and commit it"
        );
    }
}
