//! Files in a sandbox: streamed download (`GET .../files`) and upload
//! (`PUT .../files`) of any size, never held whole in the daemon's memory,
//! and stat, list, mkdir, remove and rename. Paths are absolute guest
//! paths, resolved in the guest; one that is not UTF-8 is given as
//! `path_b64` (standard base64 of its bytes) instead of `path`.

use std::io::Read;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use guest_agent::protocol::files::{FileInfo, FileKind, GuestPath, WriteFile};
use guest_agent::protocol::ErrorCode;
use guest_agent::FileDownload;
use sandbox::ClientError;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::exec::{acquire, ndjson_line, ndjson_response};
use super::extract::{Json, Path, Query};
use super::model::timestamp;
use super::sandboxes::blocking;
use crate::daemon::AppState;

/// Most entries one listing returns.
const MAX_LIST: usize = 100_000;
/// Chunks buffered between the HTTP body and the guest, each side.
const BUFFERED_CHUNKS: usize = 8;

fn b64() -> &'static base64::engine::GeneralPurpose {
    &base64::engine::general_purpose::STANDARD
}

/// A guest path as a query names it.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PathQuery {
    /// Absolute path in the guest.
    pub path: Option<String>,
    /// The path's bytes in standard base64, for a path that is not UTF-8.
    pub path_b64: Option<String>,
}

impl PathQuery {
    fn guest_path(&self) -> Result<GuestPath, ApiError> {
        query_path(&self.path, &self.path_b64)
    }
}

/// The path a query gives as `path` or `path_b64`.
fn query_path(path: &Option<String>, path_b64: &Option<String>) -> Result<GuestPath, ApiError> {
    let path = match (path, path_b64) {
        (Some(p), None) => GuestPath::from(p.as_str()),
        (None, Some(b)) => GuestPath(
            b64()
                .decode(b)
                .map_err(|e| ApiError::bad_request(format!("path_b64: {e}")))?,
        ),
        (None, None) => return Err(ApiError::bad_request("give path (or path_b64)")),
        (Some(_), Some(_)) => return Err(ApiError::bad_request("give path or path_b64, not both")),
    };
    checked(path)
}

fn checked(path: GuestPath) -> Result<GuestPath, ApiError> {
    path.check().map_err(ApiError::bad_request)?;
    Ok(path)
}

/// A guest path in a JSON body: a string, or `{"b64": "..."}` for one
/// that is not UTF-8.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum BodyPath {
    Text(String),
    Bytes { b64: String },
}

impl BodyPath {
    fn guest_path(&self) -> Result<GuestPath, ApiError> {
        checked(match self {
            BodyPath::Text(t) => GuestPath::from(t.as_str()),
            BodyPath::Bytes { b64: b } => GuestPath(
                b64()
                    .decode(b)
                    .map_err(|e| ApiError::bad_request(format!("b64: {e}")))?,
            ),
        })
    }
}

/// A file's bytes, as a request or response body.
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct FileBytes(#[allow(dead_code)] Vec<u8>);

/// What a path in the guest is.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EntryInfo {
    /// The final component of the path (invalid UTF-8 replaced; see
    /// `name_b64`).
    pub name: String,
    /// The name's bytes in base64, only when they are not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_b64: Option<String>,
    /// `file`, `dir`, `symlink` or `other`.
    #[serde(rename = "type")]
    pub kind: String,
    pub size: u64,
    /// Permission bits as a number (`420` is `0o644`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Last modification, RFC 3339.
    pub modified_at: String,
    /// Where a symlink points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<String>,
}

impl From<FileInfo> for EntryInfo {
    fn from(f: FileInfo) -> Self {
        let name_b64 = std::str::from_utf8(f.name.as_bytes())
            .is_err()
            .then(|| b64().encode(f.name.as_bytes()));
        EntryInfo {
            name: f.name.display(),
            name_b64,
            kind: match f.kind {
                FileKind::File => "file",
                FileKind::Dir => "dir",
                FileKind::Symlink => "symlink",
                FileKind::Other => "other",
            }
            .into(),
            size: f.size,
            mode: f.mode,
            uid: f.uid,
            gid: f.gid,
            modified_at: timestamp(f.mtime_ns.div_euclid(1_000_000)),
            symlink_target: f.target.map(|t| t.display()),
        }
    }
}

/// What the guest said, as the API says it.
fn guest_error(id: &str, e: ClientError) -> ApiError {
    let ClientError::Refused { code, message } = e else {
        return ApiError::new(
            StatusCode::BAD_GATEWAY,
            "guest_unavailable",
            format!("sandbox {id}'s guest did not answer: {e}"),
        );
    };
    let (status, code) = match code {
        ErrorCode::NotFound => (StatusCode::NOT_FOUND, "file_not_found"),
        ErrorCode::PermissionDenied => (StatusCode::FORBIDDEN, "permission_denied"),
        ErrorCode::AlreadyExists => (StatusCode::CONFLICT, "file_exists"),
        ErrorCode::NotADirectory => (StatusCode::CONFLICT, "not_a_directory"),
        ErrorCode::IsADirectory => (StatusCode::CONFLICT, "is_a_directory"),
        ErrorCode::DirectoryNotEmpty => (StatusCode::CONFLICT, "directory_not_empty"),
        ErrorCode::NameTooLong => (StatusCode::BAD_REQUEST, "name_too_long"),
        ErrorCode::NoSpace => (StatusCode::INSUFFICIENT_STORAGE, "no_space"),
        ErrorCode::BadRequest => (StatusCode::BAD_REQUEST, "bad_request"),
        _ => (StatusCode::BAD_GATEWAY, "guest_error"),
    };
    ApiError::new(status, code, message)
}

/// Logs what the guest said last when a transfer broke for want of an
/// answer: a crash, a stall and a reset look alike from here.
fn log_console(live: &crate::daemon::supervisor::Live, id: &str, e: &ClientError) {
    if matches!(e, ClientError::Refused { .. } | ClientError::Source(_)) {
        return;
    }
    use sandbox::Machine;
    let console = live
        .child
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .console_tail(20);
    tracing::warn!(sandbox = %id, "a file transfer broke ({e}); the guest's console:\n{console}");
}

/// Runs `f` with the running sandbox's agent, on a worker thread.
async fn with_agent<T: Send + 'static>(
    state: &Arc<AppState>,
    id: &str,
    f: impl FnOnce(&sandbox::AgentClient) -> Result<T, ClientError> + Send + 'static,
) -> Result<T, ApiError> {
    state.supervisor.store().sandbox(id)?;
    let busy = acquire(state, id).await?;
    let id = id.to_string();
    blocking(move || f(&busy.live().agent).map_err(|e| guest_error(&id, e))).await?
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ReadQuery {
    /// Absolute path in the guest.
    pub path: Option<String>,
    /// The path's bytes in standard base64, for a path that is not UTF-8.
    pub path_b64: Option<String>,
    /// Where to start, in bytes (default 0).
    pub offset: Option<u64>,
    /// Most bytes to read (default: to the end).
    pub length: Option<u64>,
}

/// Download a file; its bytes stream as they are read in the guest.
#[utoipa::path(
    get, path = "/v1/sandboxes/{id}/files", operation_id = "read_file", tag = "files",
    params(("id" = String, Path, description = "Sandbox id"), ReadQuery),
    responses(
        (status = 200, description = "The file's bytes; `X-File-Size` is its size when opened",
         content_type = "application/octet-stream", body = FileBytes),
        (status = 400, description = "Bad path", body = ErrorBody),
        (status = 404, description = "No such sandbox or file", body = ErrorBody),
        (status = 409, description = "A directory, or the sandbox is not running", body = ErrorBody),
        (status = 502, description = "Its guest did not answer", body = ErrorBody),
    )
)]
pub async fn read(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(range): Query<ReadQuery>,
) -> Result<Response, ApiError> {
    state.supervisor.store().sandbox(&id)?;
    let path = query_path(&range.path, &range.path_b64)?;
    let (offset, length) = (range.offset.unwrap_or(0), range.length);
    streamed_download(&state, &id, "application/octet-stream", move |agent| {
        agent.read_file(path, offset, length)
    })
    .await
}

/// Opens a download with `open` and streams it as the response body. The
/// sandbox stays busy while it runs; a client that leaves stops it.
async fn streamed_download(
    state: &Arc<AppState>,
    id: &str,
    content_type: &'static str,
    open: impl FnOnce(&sandbox::AgentClient) -> Result<FileDownload, ClientError> + Send + 'static,
) -> Result<Response, ApiError> {
    let busy = acquire(state, id).await?;
    let live = Arc::clone(busy.live());
    let id_for_error = id.to_string();
    let mut download =
        blocking(move || open(&live.agent).inspect_err(|e| log_console(&live, &id_for_error, e)))
            .await?
            .map_err(|e| guest_error(id, e))?;
    let size = download.size();
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(BUFFERED_CHUNKS);
    let id = id.to_string();
    std::thread::Builder::new()
        .name("file-read".into())
        .spawn(move || {
            let _busy = busy;
            loop {
                let next = match download.next_chunk() {
                    Ok(Some(chunk)) => Ok(Bytes::from(chunk)),
                    Ok(None) => return,
                    // The body ends in an error: the client sees a
                    // transfer cut short, never a short file as whole.
                    Err(e) => {
                        log_console(_busy.live(), &id, &e);
                        Err(std::io::Error::other(e.to_string()))
                    }
                };
                let failed = next.is_err();
                // A client that left: dropping the download stops it.
                if tx.blocking_send(next).is_err() || failed {
                    return;
                }
            }
        })
        .map_err(|e| ApiError::internal(format!("starting the transfer: {e}")))?;
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok((
        [
            (header::CONTENT_TYPE, content_type.to_string()),
            (
                header::HeaderName::from_static("x-file-size"),
                size.to_string(),
            ),
        ],
        body,
    )
        .into_response())
}

/// Streams the request body into the guest through `write`, then answers
/// what `path` is.
async fn streamed_upload(
    state: &Arc<AppState>,
    id: &str,
    body: Body,
    path: GuestPath,
    write: impl FnOnce(&sandbox::AgentClient, &mut dyn Read) -> Result<u64, ClientError>
        + Send
        + 'static,
) -> Result<axum::Json<EntryInfo>, ApiError> {
    let busy = acquire(state, id).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(BUFFERED_CHUNKS);
    let live = Arc::clone(busy.live());
    let id_owned = id.to_string();
    let writer = tokio::task::spawn_blocking(move || {
        let _busy = busy;
        let mut reader = BodyReader {
            rx,
            chunk: Bytes::new(),
        };
        let id = id_owned;
        write(&live.agent, &mut reader)
            .and_then(|_| live.agent.stat(path))
            .inspect_err(|e| log_console(&live, &id, e))
    });
    let mut stream = body.into_data_stream();
    while let Some(chunk) = tokio_stream::StreamExt::next(&mut stream).await {
        let chunk = chunk.map_err(|e| std::io::Error::other(format!("the upload broke: {e}")));
        let failed = chunk.is_err();
        // The writer stopped taking data: the guest refused the write.
        if tx.send(chunk).await.is_err() || failed {
            break;
        }
    }
    drop(tx);
    let written = writer
        .await
        .map_err(|e| ApiError::internal(format!("a worker failed: {e}")))?;
    match written {
        Ok(info) => Ok(axum::Json(info.into())),
        Err(ClientError::Source(e)) => Err(ApiError::bad_request(format!(
            "the upload was cut short ({e}); a file is left as it was"
        ))
        .with_code("upload_incomplete")),
        Err(e) => Err(guest_error(id, e)),
    }
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct WriteQuery {
    /// Absolute path in the guest.
    pub path: Option<String>,
    /// The path's bytes in standard base64, for a path that is not UTF-8.
    pub path_b64: Option<String>,
    /// Permission bits in octal (`644`); an existing file's are kept, a
    /// new file gets `644`.
    pub mode: Option<String>,
    /// Owner; an existing file's is kept, a new file is root's.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Modification time to set, milliseconds since the Unix epoch.
    pub mtime_ms: Option<u64>,
    /// Create missing parent directories.
    pub parents: Option<bool>,
}

fn octal_mode(mode: &str) -> Result<u32, ApiError> {
    let digits = mode.strip_prefix("0o").unwrap_or(mode);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o7777 && !digits.is_empty() => Ok(m),
        _ => Err(ApiError::bad_request(format!(
            "mode {mode:?} is not octal permission bits (0 to 7777)"
        ))),
    }
}

/// The upload's bytes, as the guest's writer reads them.
struct BodyReader {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    chunk: Bytes,
}

impl Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => self.chunk = chunk,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

/// Upload a file: the request body is its content, streamed to the guest
/// as fast as its disk takes it. The file appears whole once every byte
/// is written; an upload cut short leaves the old file as it was.
#[utoipa::path(
    put, path = "/v1/sandboxes/{id}/files", operation_id = "write_file", tag = "files",
    params(("id" = String, Path, description = "Sandbox id"), WriteQuery),
    request_body(content = FileBytes, content_type = "application/octet-stream"),
    responses(
        (status = 200, description = "Written: what the file is now", body = EntryInfo),
        (status = 400, description = "Bad path or parameters, or the upload was cut short", body = ErrorBody),
        (status = 403, description = "The guest refused it", body = ErrorBody),
        (status = 404, description = "No such sandbox or parent directory", body = ErrorBody),
        (status = 409, description = "A directory, or the sandbox is not running", body = ErrorBody),
        (status = 502, description = "Its guest did not answer", body = ErrorBody),
        (status = 507, description = "The guest's disk is full", body = ErrorBody),
    )
)]
pub async fn write(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(options): Query<WriteQuery>,
    body: Body,
) -> Result<axum::Json<EntryInfo>, ApiError> {
    state.supervisor.store().sandbox(&id)?;
    let request = WriteFile {
        path: query_path(&options.path, &options.path_b64)?,
        mode: options.mode.as_deref().map(octal_mode).transpose()?,
        uid: options.uid,
        gid: options.gid,
        mtime_ns: options
            .mtime_ms
            .map(|ms| i64::try_from(ms.saturating_mul(1_000_000)).unwrap_or(i64::MAX)),
        parents: options.parents.unwrap_or(false),
    };
    let path = request.path.clone();
    streamed_upload(&state, &id, body, path, move |agent, data| {
        agent.write_file(request, data)
    })
    .await
}

/// Download a directory tree as a tar stream.
#[utoipa::path(
    get, path = "/v1/sandboxes/{id}/files/archive", operation_id = "read_tree", tag = "files",
    params(("id" = String, Path, description = "Sandbox id"), PathQuery),
    responses(
        (status = 200, description = "A tar archive of the directory (symlinks as symlinks; modes, owners and times kept), streamed as it is made",
         content_type = "application/x-tar", body = FileBytes),
        (status = 400, description = "Bad path", body = ErrorBody),
        (status = 404, description = "No such sandbox or directory", body = ErrorBody),
        (status = 409, description = "Not a directory, or the sandbox is not running", body = ErrorBody),
        (status = 502, description = "Its guest did not answer", body = ErrorBody),
    )
)]
pub async fn read_tree(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(path): Query<PathQuery>,
) -> Result<Response, ApiError> {
    state.supervisor.store().sandbox(&id)?;
    let path = path.guest_path()?;
    streamed_download(&state, &id, "application/x-tar", move |agent| {
        agent.read_tree(path)
    })
    .await
}

/// Unpack a tar stream into a directory (made, with its parents, if
/// missing). Entries that would land outside it are refused; what was
/// unpacked before a failure stays.
#[utoipa::path(
    put, path = "/v1/sandboxes/{id}/files/archive", operation_id = "write_tree", tag = "files",
    params(("id" = String, Path, description = "Sandbox id"), PathQuery),
    request_body(content = FileBytes, content_type = "application/octet-stream",
                 description = "A tar archive (any content type is taken)"),
    responses(
        (status = 200, description = "Unpacked: what the directory is now", body = EntryInfo),
        (status = 400, description = "Bad path, or the upload was cut short", body = ErrorBody),
        (status = 403, description = "The guest refused it", body = ErrorBody),
        (status = 404, description = "No such sandbox", body = ErrorBody),
        (status = 409, description = "Not a directory, or the sandbox is not running", body = ErrorBody),
        (status = 502, description = "Its guest did not answer, or the archive is broken", body = ErrorBody),
        (status = 507, description = "The guest's disk is full", body = ErrorBody),
    )
)]
pub async fn write_tree(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(path): Query<PathQuery>,
    body: Body,
) -> Result<axum::Json<EntryInfo>, ApiError> {
    state.supervisor.store().sandbox(&id)?;
    let path = path.guest_path()?;
    let dir = path.clone();
    streamed_upload(&state, &id, body, path, move |agent, data| {
        agent.write_tree(dir, data)
    })
    .await
}

/// What a path in the sandbox is (a final symlink is not followed).
#[utoipa::path(
    get, path = "/v1/sandboxes/{id}/files/stat", operation_id = "stat_file", tag = "files",
    params(("id" = String, Path, description = "Sandbox id"), PathQuery),
    responses(
        (status = 200, description = "What it is", body = EntryInfo),
        (status = 400, description = "Bad path", body = ErrorBody),
        (status = 404, description = "No such sandbox or file", body = ErrorBody),
        (status = 409, description = "It is not running", body = ErrorBody),
        (status = 502, description = "Its guest did not answer", body = ErrorBody),
    )
)]
pub async fn stat(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(path): Query<PathQuery>,
) -> Result<axum::Json<EntryInfo>, ApiError> {
    state.supervisor.store().sandbox(&id)?;
    let path = path.guest_path()?;
    let info = with_agent(&state, &id, move |agent| agent.stat(path)).await?;
    Ok(axum::Json(info.into()))
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Absolute path in the guest.
    pub path: Option<String>,
    /// The path's bytes in standard base64, for a path that is not UTF-8.
    pub path_b64: Option<String>,
    /// Most entries to return (default and most 100000).
    #[param(minimum = 1, maximum = 100000)]
    pub limit: Option<u64>,
}

/// A directory's entries.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Listing {
    /// In name order (by bytes).
    pub entries: Vec<EntryInfo>,
    /// The directory has more entries than were returned.
    pub truncated: bool,
}

/// List a directory, in name order.
#[utoipa::path(
    get, path = "/v1/sandboxes/{id}/files/list", operation_id = "list_files", tag = "files",
    params(("id" = String, Path, description = "Sandbox id"), ListQuery),
    responses(
        (status = 200, description = "Its entries", body = Listing),
        (status = 400, description = "Bad path or limit", body = ErrorBody),
        (status = 404, description = "No such sandbox or directory", body = ErrorBody),
        (status = 409, description = "Not a directory, or the sandbox is not running", body = ErrorBody),
        (status = 502, description = "Its guest did not answer", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(query): Query<ListQuery>,
) -> Result<axum::Json<Listing>, ApiError> {
    state.supervisor.store().sandbox(&id)?;
    let path = query_path(&query.path, &query.path_b64)?;
    let limit = match query.limit {
        None => MAX_LIST,
        Some(n @ 1..=100_000) => n as usize,
        Some(_) => return Err(ApiError::bad_request("limit must be 1 to 100000")),
    };
    let listing = with_agent(&state, &id, move |agent| agent.list(path, limit)).await?;
    Ok(axum::Json(Listing {
        entries: listing.entries.into_iter().map(EntryInfo::from).collect(),
        truncated: listing.more,
    }))
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct RemoveQuery {
    /// Absolute path in the guest.
    pub path: Option<String>,
    /// The path's bytes in standard base64, for a path that is not UTF-8.
    pub path_b64: Option<String>,
    /// Remove a directory and everything in it.
    pub recursive: Option<bool>,
}

/// Remove a file, a symlink or an empty directory (any directory with
/// `recursive`).
#[utoipa::path(
    delete, path = "/v1/sandboxes/{id}/files", operation_id = "remove_file", tag = "files",
    params(("id" = String, Path, description = "Sandbox id"), RemoveQuery),
    responses(
        (status = 204, description = "Removed"),
        (status = 400, description = "Bad path", body = ErrorBody),
        (status = 404, description = "No such sandbox or file", body = ErrorBody),
        (status = 409, description = "A directory that is not empty, or the sandbox is not running", body = ErrorBody),
        (status = 502, description = "Its guest did not answer", body = ErrorBody),
    )
)]
pub async fn remove(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(query): Query<RemoveQuery>,
) -> Result<StatusCode, ApiError> {
    state.supervisor.store().sandbox(&id)?;
    let path = query_path(&query.path, &query.path_b64)?;
    let recursive = query.recursive.unwrap_or(false);
    with_agent(&state, &id, move |agent| agent.remove(path, recursive)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MkdirBody {
    pub path: BodyPath,
    /// Create missing parents too; an existing directory is then no error.
    #[serde(default)]
    pub parents: bool,
    /// Permission bits in octal (default `755`).
    pub mode: Option<String>,
}

/// Make a directory.
#[utoipa::path(
    post, path = "/v1/sandboxes/{id}/files/mkdir", operation_id = "make_dir", tag = "files",
    params(("id" = String, Path, description = "Sandbox id")),
    request_body = MkdirBody,
    responses(
        (status = 200, description = "Made: what it is", body = EntryInfo),
        (status = 400, description = "Bad path or mode", body = ErrorBody),
        (status = 404, description = "No such sandbox or parent", body = ErrorBody),
        (status = 409, description = "It exists, or the sandbox is not running", body = ErrorBody),
        (status = 502, description = "Its guest did not answer", body = ErrorBody),
    )
)]
pub async fn mkdir(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Json(body): Json<MkdirBody>,
) -> Result<axum::Json<EntryInfo>, ApiError> {
    state.supervisor.store().sandbox(&id)?;
    let path = body.path.guest_path()?;
    let mode = body.mode.as_deref().map(octal_mode).transpose()?;
    let parents = body.parents;
    let info = with_agent(&state, &id, move |agent| {
        agent.mkdir(path.clone(), parents, mode)?;
        agent.stat(path)
    })
    .await?;
    Ok(axum::Json(info.into()))
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenameBody {
    pub from: BodyPath,
    pub to: BodyPath,
}

/// Rename (move) a path inside the sandbox, replacing a file at `to`.
#[utoipa::path(
    post, path = "/v1/sandboxes/{id}/files/rename", operation_id = "rename_file", tag = "files",
    params(("id" = String, Path, description = "Sandbox id")),
    request_body = RenameBody,
    responses(
        (status = 200, description = "Renamed: what `to` is now", body = EntryInfo),
        (status = 400, description = "Bad path", body = ErrorBody),
        (status = 404, description = "No such sandbox or path", body = ErrorBody),
        (status = 409, description = "A conflict with what is at `to`, or the sandbox is not running", body = ErrorBody),
        (status = 502, description = "Its guest did not answer", body = ErrorBody),
    )
)]
pub async fn rename(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Json(body): Json<RenameBody>,
) -> Result<axum::Json<EntryInfo>, ApiError> {
    state.supervisor.store().sandbox(&id)?;
    let (from, to) = (body.from.guest_path()?, body.to.guest_path()?);
    let info = with_agent(&state, &id, move |agent| {
        agent.rename(from, to.clone())?;
        agent.stat(to)
    })
    .await?;
    Ok(axum::Json(info.into()))
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct WatchQuery {
    /// Absolute path of the directory in the guest.
    pub path: Option<String>,
    /// The path's bytes in standard base64, for a path that is not UTF-8.
    pub path_b64: Option<String>,
    /// Watch every directory under it too, including ones made later.
    pub recursive: Option<bool>,
}

/// One line of a watch.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WatchLine {
    /// `create`, `write`, `remove`, `rename_from`, `rename_to`, `chmod`,
    /// `overflow` (events were lost), or `error` (the last line: the watch
    /// ended, `code` and `message` say why).
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The path's bytes in base64, only when they are not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_b64: Option<String>,
    #[serde(default)]
    pub dir: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl WatchLine {
    fn event(e: guest_agent::protocol::files::WatchEvent) -> Self {
        let kind = serde_json::to_value(e.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        WatchLine {
            kind,
            path: Some(e.path.display()),
            path_b64: std::str::from_utf8(e.path.as_bytes())
                .is_err()
                .then(|| b64().encode(e.path.as_bytes())),
            dir: e.dir,
            code: None,
            message: None,
        }
    }

    fn error(code: &str, message: String) -> Self {
        WatchLine {
            kind: "error".into(),
            path: None,
            path_b64: None,
            dir: false,
            code: Some(code.into()),
            message: Some(message),
        }
    }
}

/// Watch a directory: its events as newline-delimited JSON, in the order
/// they happened, for as long as the client stays.
#[utoipa::path(
    get, path = "/v1/sandboxes/{id}/files/watch", operation_id = "watch_dir", tag = "files",
    params(("id" = String, Path, description = "Sandbox id"), WatchQuery),
    responses(
        (status = 200, description = "Events, one JSON object per line",
         content_type = "application/x-ndjson", body = WatchLine),
        (status = 400, description = "Bad path", body = ErrorBody),
        (status = 404, description = "No such sandbox or directory", body = ErrorBody),
        (status = 409, description = "Not a directory, or the sandbox is not running", body = ErrorBody),
        (status = 502, description = "Its guest did not answer", body = ErrorBody),
    )
)]
pub async fn watch(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(query): Query<WatchQuery>,
) -> Result<Response, ApiError> {
    state.supervisor.store().sandbox(&id)?;
    let path = query_path(&query.path, &query.path_b64)?;
    let recursive = query.recursive.unwrap_or(false);
    let busy = acquire(&state, &id).await?;
    let live = Arc::clone(busy.live());
    let id_for_error = id.clone();
    let mut watch = blocking(move || live.agent.watch(path, recursive))
        .await?
        .map_err(|e| guest_error(&id_for_error, e))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(BUFFERED_CHUNKS);
    std::thread::Builder::new()
        .name("file-watch".into())
        .spawn(move || {
            let _busy = busy;
            loop {
                let next = watch.next_event(Some(std::time::Duration::from_secs(1)));
                let out = match next {
                    // Quiet: is anyone still listening?
                    Err(ClientError::Timeout) if tx.is_closed() => return,
                    Err(ClientError::Timeout) => continue,
                    Ok(Some(event)) => WatchLine::event(event),
                    Ok(None) => return,
                    Err(e) => {
                        let e = guest_error(&id, e);
                        let _ = tx.blocking_send(ndjson_line(&WatchLine::error(e.code, e.message)));
                        return;
                    }
                };
                if tx.blocking_send(ndjson_line(&out)).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| ApiError::internal(format!("starting the watch: {e}")))?;
    Ok(ndjson_response(rx))
}
