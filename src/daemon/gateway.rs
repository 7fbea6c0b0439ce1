//! The preview gateway (`capsule serve --gateway ADDR`): HTTP on one host
//! address, routed by host name. A request for `<port>-<sandbox id>.<domain>`
//! (default domain `localhost`, which resolves to loopback everywhere)
//! goes to that exposed port of that sandbox, over the agent like a port
//! forward. Only the request head is read here (to find the host); the
//! rest of the connection, a WebSocket upgrade included, passes through
//! untouched. A host that names no sandbox, or a port it has not exposed,
//! gets 404 with the reason; a sandbox not running, or a port nothing in
//! the guest listens on, 502.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::ports::bridge;
use super::supervisor::Supervisor;
use crate::store::StoreError;

/// Largest request head the gateway reads before routing.
const MAX_HEAD: usize = 16 << 10;
/// How long a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections the gateway carries at once (each holds threads).
const MAX_CONNECTIONS: usize = 512;

/// Where previews are served, for the URLs the API hands out.
#[derive(Clone, Debug)]
pub struct Gateway {
    pub addr: SocketAddr,
    pub domain: String,
}

impl Gateway {
    /// The preview URL of guest `port` of sandbox `id`.
    pub fn url(&self, id: &str, port: u16) -> String {
        format!("http://{port}-{id}.{}:{}/", self.domain, self.addr.port())
    }
}

/// Binds `addr` and serves previews on threads of its own.
pub fn start(supervisor: Arc<Supervisor>, addr: SocketAddr, domain: String) -> Result<Gateway> {
    let listener =
        TcpListener::bind(addr).with_context(|| format!("listening for previews on {addr}"))?;
    let gateway = Gateway {
        addr: listener.local_addr()?,
        domain: domain.to_ascii_lowercase(),
    };
    let routing = gateway.clone();
    let open = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("gateway".into())
        .spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else {
                    // Out of descriptors, say: wait rather than spin.
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                };
                if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                    open.fetch_sub(1, Ordering::SeqCst);
                    let mut client = client;
                    let _ = client.write_all(&response(
                        503,
                        "busy",
                        &format!("the gateway carries at most {MAX_CONNECTIONS} connections"),
                    ));
                    continue;
                }
                let (supervisor, routing, open) =
                    (Arc::clone(&supervisor), routing.clone(), Arc::clone(&open));
                let spawned = std::thread::Builder::new()
                    .name("preview".into())
                    .spawn(move || {
                        serve(client, &supervisor, &routing.domain);
                        open.fetch_sub(1, Ordering::SeqCst);
                    });
                if spawned.is_err() {
                    tracing::warn!("the gateway cannot start a thread; a connection dropped");
                }
            }
        })?;
    tracing::info!(
        "serving previews on http://{} (http://<port>-<sandbox>.{}:{}/)",
        gateway.addr,
        gateway.domain,
        gateway.addr.port()
    );
    Ok(gateway)
}

/// A refusal as an HTTP response, closing the connection.
fn response(status: u16, code: &str, message: &str) -> Vec<u8> {
    let reason = match status {
        400 => "Bad Request",
        404 => "Not Found",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        _ => "Service Unavailable",
    };
    let body = serde_json::json!({ "code": code, "message": message }).to_string();
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Why a request was not routed.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

fn refuse(status: u16, code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        code,
        message: message.into(),
    }
}

/// The guest port and sandbox id a `Host` header names under `domain`:
/// `<port>-<id>.<domain>`, with or without `:<port>` after it.
pub fn route(host: &str, domain: &str) -> Result<(u16, String), Refusal> {
    let host = host.trim().to_ascii_lowercase();
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host.as_str(),
    };
    let not_preview = || {
        refuse(
            404,
            "not_a_preview",
            format!("{host:?} is not a preview host: previews are <port>-<sandbox id>.{domain}"),
        )
    };
    let label = name
        .strip_suffix(domain)
        .and_then(|rest| rest.strip_suffix('.'))
        .ok_or_else(not_preview)?;
    let (port, id) = label.split_once('-').ok_or_else(not_preview)?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(not_preview)?;
    if id.is_empty() || id.contains('.') {
        return Err(not_preview());
    }
    Ok((port, id.to_string()))
}

/// Reads the request head (bounded in size and time). Returns it and the
/// `Host` header's value.
fn read_head(client: &mut TcpStream) -> Result<(Vec<u8>, String), Refusal> {
    let deadline = Instant::now() + HEAD_TIMEOUT;
    let mut head = Vec::with_capacity(4096);
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || client.set_read_timeout(Some(left)).is_err() {
            return Err(refuse(408, "timeout", "the request head took too long"));
        }
        let n = match client.read(&mut buf) {
            Ok(0) => {
                return Err(refuse(
                    400,
                    "bad_request",
                    "the connection closed mid-request",
                ))
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return Err(refuse(408, "timeout", "the request head took too long")),
        };
        head.extend_from_slice(&buf[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&head) {
            Ok(httparse::Status::Complete(_)) => {
                let host = request
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("host"))
                    .and_then(|h| std::str::from_utf8(h.value).ok())
                    .map(str::to_string)
                    .ok_or_else(|| refuse(400, "bad_request", "the request has no Host header"))?;
                let _ = client.set_read_timeout(None);
                return Ok((head, host));
            }
            Ok(httparse::Status::Partial) if head.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => {
                return Err(refuse(
                    431,
                    "head_too_large",
                    format!("a request head is at most {MAX_HEAD} bytes"),
                ))
            }
            Err(e) => return Err(refuse(400, "bad_request", format!("not HTTP: {e}"))),
        }
    }
}

fn serve(mut client: TcpStream, supervisor: &Supervisor, domain: &str) {
    let routed = read_head(&mut client).and_then(|(head, host)| {
        let (port, id) = route(&host, domain)?;
        let guest = connect(supervisor, &id, port)?;
        Ok((head, guest))
    });
    match routed {
        Ok((head, guest)) => bridge(client, guest, &head),
        Err(refusal) => {
            let _ = client.write_all(&response(refusal.status, refusal.code, &refusal.message));
        }
    }
}

/// A stream to exposed guest `port` of running sandbox `id`.
fn connect(supervisor: &Supervisor, id: &str, port: u16) -> Result<sandbox::PortStream, Refusal> {
    let exposed = {
        let store = supervisor.store();
        let record = store.sandbox(id).map_err(|e| match e {
            StoreError::NotFound { .. } => {
                refuse(404, "sandbox_not_found", format!("no sandbox {id}"))
            }
            other => refuse(502, "internal", other.to_string()),
        })?;
        let exposed = store
            .port(id, port)
            .map_err(|e| refuse(502, "internal", e.to_string()))?;
        (record.state, exposed)
    };
    match exposed {
        (_, None) => Err(refuse(
            404,
            "port_not_exposed",
            format!(
                "port {port} of sandbox {id} is not exposed (POST /v1/sandboxes/{id}/ports or \
                 `capsule port {id} {port}`)"
            ),
        )),
        (state, Some(_)) => {
            let live = supervisor.live(id).ok_or_else(|| {
                refuse(
                    502,
                    "sandbox_not_running",
                    format!("sandbox {id} is {state}, not running"),
                )
            })?;
            live.agent.connect_port(port).map_err(|e| {
                refuse(
                    502,
                    "guest_refused",
                    format!("nothing in sandbox {id} took a connection to port {port}: {e}"),
                )
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preview_hosts_name_a_port_and_a_sandbox() {
        let ok = |host: &str| route(host, "localhost").map_err(|r| r.message);
        assert_eq!(ok("8000-sb-abc.localhost"), Ok((8000, "sb-abc".into())));
        assert_eq!(
            ok("8000-sb-abc.localhost:7880"),
            Ok((8000, "sb-abc".into()))
        );
        assert_eq!(ok("3000-SB-ABC.LocalHost"), Ok((3000, "sb-abc".into())));
        assert_eq!(
            route("80-sb-x.preview.example.com", "preview.example.com").map_err(|r| r.code),
            Ok((80, "sb-x".into()))
        );
        for bad in [
            "localhost",
            "sb-abc.localhost",
            "0-sb-abc.localhost",
            "70000-sb-abc.localhost",
            "x8000-sb-abc.localhost",
            "8000-.localhost",
            "8000-sb.abc.localhost",
            "8000-sb-abc.localhost.evil.com",
            "8000-sb-abcXlocalhost",
            "8000-sb-abc.otherlocalhost",
            "",
        ] {
            let refusal = route(bad, "localhost").expect_err(bad);
            assert_eq!(
                (refusal.status, refusal.code),
                (404, "not_a_preview"),
                "{bad}"
            );
        }
    }

    #[test]
    fn refusals_are_whole_http_responses_with_a_json_body() {
        let text = String::from_utf8(response(502, "guest_refused", "nothing \"there\"")).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{head}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["code"], "guest_refused");
        assert_eq!(body["message"], "nothing \"there\"");
    }
}
