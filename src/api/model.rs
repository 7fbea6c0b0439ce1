//! The API's resources as they travel: request and response bodies, in
//! snake_case JSON, described for the OpenAPI document.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::store::{EndReason, SandboxRecord, SandboxState};

/// A time as the API shows it: RFC 3339 in UTC, to the millisecond.
pub fn timestamp(unix_ms: i64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms.max(0) as u64);
    humantime::format_rfc3339_millis(at).to_string()
}

/// POST /v1/sandboxes
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// Restore it from this template (or snapshot): it starts primed, in
    /// milliseconds, with its own identity. The template sets the root
    /// filesystem, vCPUs and memory, so those may not be given too.
    #[schema(pattern = "^[a-z0-9][a-z0-9._-]{0,62}$")]
    pub template: Option<String>,
    /// An ext4 root filesystem image on the daemon's host, by absolute
    /// path (default: the guest's initramfs alone).
    #[schema(pattern = "^/")]
    pub rootfs: Option<String>,
    /// Guest kernel (default: the daemon's).
    #[schema(pattern = "^/")]
    pub kernel: Option<String>,
    /// Initramfs holding the guest agent (default: the daemon's).
    #[schema(pattern = "^/")]
    pub initramfs: Option<String>,
    /// vCPUs, 1 to 64 (default 1).
    #[serde(default, deserialize_with = "crate::json_num::opt_u32")]
    #[schema(minimum = 1, maximum = 64)]
    pub cpus: Option<u32>,
    /// Guest memory in MiB, 32 to 1048576 (default 256).
    #[serde(default, deserialize_with = "crate::json_num::opt_u32")]
    #[schema(minimum = 32, maximum = 1048576)]
    pub memory_mib: Option<u32>,
    /// The group whose quota it counts against (default `default`).
    #[schema(pattern = "^[a-z0-9][a-z0-9._-]{0,62}$")]
    pub group: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Seconds until it expires and is destroyed (default 300; 0: never;
    /// at most 30 days).
    #[serde(default, deserialize_with = "crate::json_num::opt_u64")]
    #[schema(minimum = 0, maximum = 2592000)]
    pub timeout_seconds: Option<u64>,
    /// Names of the group's secrets: every command in the sandbox gets
    /// each as an environment variable of that name. The values never
    /// enter the guest's disk and are never shown by the API.
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Suspend it to disk after this many seconds without a command; the
    /// next command resumes it (the caller sees extra latency, never an
    /// error). Default: never.
    #[serde(default, deserialize_with = "crate::json_num::opt_u64")]
    #[schema(minimum = 1, maximum = 2592000)]
    pub idle_suspend_seconds: Option<u64>,
    /// Environment variables every command in it gets (a command's own
    /// `env` wins; these are not secret: use `secrets` for those).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// Why and when a sandbox ended.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Ending {
    pub reason: EndReason,
    pub detail: String,
    pub at: String,
}

/// A sandbox.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Sandbox {
    pub id: String,
    pub state: SandboxState,
    pub group: String,
    pub cpus: u32,
    pub memory_mib: u32,
    pub labels: BTreeMap<String, String>,
    pub created_at: String,
    /// When it expires, if it does.
    pub end_at: Option<String>,
    /// Set once it has ended.
    pub ended: Option<Ending>,
    /// The names of the secrets its commands get (never their values).
    pub secrets: Vec<String>,
    /// Seconds without a command after which it is suspended, if set.
    pub idle_suspend_seconds: Option<u64>,
    /// Environment every command in it gets.
    pub env: BTreeMap<String, String>,
}

impl From<&SandboxRecord> for Sandbox {
    fn from(r: &SandboxRecord) -> Self {
        Sandbox {
            id: r.id.clone(),
            state: r.state,
            group: r.group.clone(),
            cpus: r.cpus,
            memory_mib: r.memory_mib,
            labels: r.labels.clone(),
            created_at: timestamp(r.created_at),
            end_at: r.end_at.map(timestamp),
            ended: r.end_reason.map(|reason| Ending {
                reason,
                detail: r.end_detail.clone().unwrap_or_default(),
                at: timestamp(r.ended_at.unwrap_or(r.created_at)),
            }),
            secrets: r.secrets.clone(),
            idle_suspend_seconds: r.idle_suspend_ms.map(|ms| ms.max(0) as u64 / 1000),
            env: r.env.clone(),
        }
    }
}

/// GET /v1/sandboxes query.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListSandboxes {
    /// Kubernetes-style: `owner=alice,job!=7,tier in (a,b),!debug`.
    #[param(
        pattern = r"^ *(((([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.){0,3}[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?/)?[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?( *(=|==|!=) *([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?| +(in|notin) *\( *([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?( *, *([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?){0,7} *\))?|!(([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.){0,3}[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?/)?[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)( *, *((([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.){0,3}[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?/)?[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?( *(=|==|!=) *([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?| +(in|notin) *\( *([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?( *, *([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?){0,7} *\))?|!(([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.){0,3}[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?/)?[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)){0,15})? *$",
        max_length = 4096
    )]
    pub label_selector: Option<String>,
    /// Comma-separated states (default: all but `ended`).
    #[param(
        pattern = "^((creating|running|suspended|ended)(,(creating|running|suspended|ended)){0,3})?$"
    )]
    pub state: Option<String>,
}
