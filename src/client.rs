//! The CLI's side of the HTTP API: requests to the daemon over its Unix
//! socket. Every daemon-backed CLI command goes through here, so anything
//! the CLI does a program can do with the same requests.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use crate::api::error::ErrorBody;

/// A request the daemon refused, with its status and stable code.
#[derive(Debug, thiserror::Error)]
#[error("{message} ({code})")]
pub struct ApiRefusal {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
}

/// The daemon could not be reached at all.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DaemonUnreachable(String);

/// Percent-encodes a path segment or a query value.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub struct ApiClient {
    socket: PathBuf,
    runtime: tokio::runtime::Runtime,
}

/// How long a connection to the daemon may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl ApiClient {
    /// The daemon at `$CAPSULE_HOME/api.sock`.
    pub fn new() -> Result<ApiClient> {
        let socket = crate::daemon::socket_path()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(ApiClient { socket, runtime })
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
        let stream = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::UnixStream::connect(&self.socket),
        )
        .await
        .map_err(|_| {
            DaemonUnreachable(format!(
                "the daemon at {} does not answer",
                self.socket.display()
            ))
        })?
        .map_err(|e| {
            DaemonUnreachable(format!(
                "cannot reach the daemon at {} ({e}); start it with `capsule serve`",
                self.socket.display()
            ))
        })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("talking to the daemon")?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "capsule");
        if body.is_some() {
            request = request.header("content-type", "application/json");
        }
        let request = request.body(Full::new(Bytes::from(bytes)))?;
        let response = sender
            .send_request(request)
            .await
            .context("the daemon closed the connection")?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Err(match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(e) => ApiRefusal {
                status,
                code: e.code,
                message: e.message,
            }
            .into(),
            Err(_) => anyhow!(
                "the daemon answered {status}: {}",
                String::from_utf8_lossy(&body)
            ),
        })
    }

    /// A request whose answer is JSON (or nothing, for 204).
    pub fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T> {
        self.runtime.block_on(async {
            let response = self.send(method, path, body.as_ref()).await?;
            let status = response.status();
            let bytes = response.into_body().collect().await?.to_bytes();
            let bytes = if status == StatusCode::NO_CONTENT {
                Bytes::from_static(b"null")
            } else {
                bytes
            };
            serde_json::from_slice(&bytes)
                .with_context(|| format!("the daemon's answer to {path} is not what was expected"))
        })
    }

    /// A DELETE, whose success has no body.
    pub fn delete(&self, path: &str) -> Result<()> {
        self.call(Method::DELETE, path, None)
    }

    /// A request whose answer streams: each line (without its newline)
    /// is given to `each` as it arrives.
    pub fn stream_lines(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
        mut each: impl FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        self.runtime.block_on(async {
            let mut body_stream = self.send(method, path, body.as_ref()).await?.into_body();
            let mut pending: Vec<u8> = Vec::new();
            while let Some(frame) = body_stream.frame().await {
                let frame = frame.context("the daemon's stream broke")?;
                let Some(data) = frame.data_ref() else {
                    continue;
                };
                pending.extend_from_slice(data);
                while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    each(&line[..line.len() - 1])?;
                }
            }
            Ok(())
        })
    }
}
