//! The CLI's side of the HTTP API: requests to the daemon over its Unix
//! socket. Every daemon-backed CLI command goes through here, so anything
//! the CLI does a program can do with the same requests.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame};
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

/// The error for a refused request: the API's code and message when the
/// body has them.
fn refusal(status: StatusCode, body: &[u8]) -> anyhow::Error {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => ApiRefusal {
            status,
            code: e.code,
            message: e.message,
        }
        .into(),
        Err(_) => anyhow!(
            "the daemon answered {status}: {}",
            String::from_utf8_lossy(body)
        ),
    }
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
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let full = Full::new(Bytes::from(bytes))
            .map_err(|never: std::convert::Infallible| -> std::io::Error { match never {} })
            .boxed();
        let content_type = body.is_some().then_some("application/json");
        self.send_body(method, path, content_type, full).await
    }

    /// Runs `f` on the client's runtime.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    /// A WebSocket session with the daemon at `path`; a refusal before the
    /// upgrade is an [`ApiRefusal`] like any other request's.
    pub async fn websocket(
        &self,
        path: &str,
    ) -> Result<tokio_tungstenite::WebSocketStream<tokio::net::UnixStream>> {
        use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Error};
        let stream = self.connect().await?;
        let request = format!("ws://capsule{path}").into_client_request()?;
        match tokio_tungstenite::client_async(request, stream).await {
            Ok((socket, _)) => Ok(socket),
            Err(Error::Http(response)) => {
                let body = response.body().clone().unwrap_or_default();
                Err(refusal(response.status(), &body))
            }
            Err(e) => Err(anyhow!("opening a WebSocket to the daemon: {e}")),
        }
    }

    async fn connect(&self) -> Result<tokio::net::UnixStream> {
        Ok(tokio::time::timeout(
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
        })?)
    }

    async fn send_body(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: BoxBody<Bytes, std::io::Error>,
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
        let stream = self.connect().await?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("talking to the daemon")?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "capsule");
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let request = request.body(body)?;
        let response = sender
            .send_request(request)
            .await
            .context("the daemon closed the connection")?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Err(refusal(status, &body))
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

    /// A PUT whose body streams from `source` (read on a thread of its
    /// own), with `sent` told the running total; the answer is JSON.
    pub fn upload<T: DeserializeOwned>(
        &self,
        path: &str,
        mut source: Box<dyn std::io::Read + Send>,
        sent: Box<dyn Fn(u64) + Send>,
    ) -> Result<T> {
        self.runtime.block_on(async {
            let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Frame<Bytes>>>(4);
            std::thread::spawn(move || {
                let mut total = 0u64;
                loop {
                    let mut buf = vec![0u8; UPLOAD_CHUNK];
                    let chunk = match source.read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) => {
                            buf.truncate(n);
                            total += n as u64;
                            Ok(Frame::data(Bytes::from(buf)))
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => Err(e),
                    };
                    let failed = chunk.is_err();
                    if tx.blocking_send(chunk).is_err() || failed {
                        return;
                    }
                    sent(total);
                }
            });
            let body = BoxBody::new(StreamBody::new(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            ));
            let response = self
                .send_body(Method::PUT, path, Some("application/octet-stream"), body)
                .await?;
            let bytes = response.into_body().collect().await?.to_bytes();
            serde_json::from_slice(&bytes)
                .with_context(|| format!("the daemon's answer to {path} is not what was expected"))
        })
    }

    /// A GET whose body streams into `sink`; `size` is told the
    /// `X-File-Size` header first, then `received` the running total.
    /// Returns the bytes written. A body cut short is an error.
    pub fn download(
        &self,
        path: &str,
        sink: &mut dyn std::io::Write,
        size: &mut dyn FnMut(Option<u64>),
        received: &mut dyn FnMut(u64),
    ) -> Result<u64> {
        self.runtime.block_on(async {
            let response = self.send(Method::GET, path, None).await?;
            size(
                response
                    .headers()
                    .get("x-file-size")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok()),
            );
            let mut body = response.into_body();
            let mut total = 0u64;
            while let Some(frame) = body.frame().await {
                let frame = frame.context("the download broke off")?;
                if let Some(data) = frame.data_ref() {
                    sink.write_all(data).context("writing the download")?;
                    total += data.len() as u64;
                    received(total);
                }
            }
            Ok(total)
        })
    }
}

/// Bytes per chunk of an upload's body.
const UPLOAD_CHUNK: usize = 256 << 10;
