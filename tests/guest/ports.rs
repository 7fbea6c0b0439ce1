//! Guest ports exposed on the host through the daemon: an HTTP server in
//! the guest (busybox httpd, on the guest's loopback only, with no guest
//! network device) reached from the host with curl, a megabyte intact,
//! both at its forwarded address and through the preview gateway by host
//! name; the exposure closed while the sandbox is suspended and back, at
//! the same address, once it resumes; gone when unexposed or deleted,
//! with the gateway saying why.

use std::process::Command;

use super::daemon::{create, Daemon};
use super::*;

/// curl's exit status and body for `url` (a short timeout: a closed
/// forward fails at once).
fn curl(url: &str, extra: &[&str]) -> (i32, Vec<u8>) {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "30"])
        .args(extra)
        .arg(url)
        .output()
        .expect("curl is needed");
    (out.status.code().unwrap_or(-1), out.stdout)
}

/// Waits until the guest's server answers through the forward.
fn until_served(url: &str) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, body) = curl(url, &[]);
        if code == 0 && !body.is_empty() {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{url} never answered (curl {code})"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A daemon that also serves previews, on a port of its own.
fn start_with_gateway() -> (Daemon, u16) {
    let gateway = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let d = Daemon::start_in(
        tempfile::tempdir().unwrap(),
        &artifact("CAPSULE_KERNEL"),
        &artifact("CAPSULE_INITRAMFS"),
        &["--gateway", &format!("127.0.0.1:{gateway}")],
    );
    (d, gateway)
}

/// Status and body through the gateway for `host`.
fn preview(gateway: u16, host: &str, path: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "30", "-w", "\n%{http_code}", "-H"])
        .arg(format!("Host: {host}"))
        .arg(format!("http://127.0.0.1:{gateway}{path}"))
        .output()
        .expect("curl is needed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", ""));
    (status.trim().parse().unwrap_or(0), body.to_string())
}

fn expose(d: &Daemon, id: &str, port: &str) -> String {
    let (code, out, err) = d.capsule(&["port", id, port]);
    assert_eq!(code, 0, "{err}");
    let address = out.trim().to_string();
    assert!(address.starts_with("127.0.0.1:"), "{address}");
    address
}

#[test]
fn a_guest_http_server_is_reached_from_the_host_through_an_exposed_port_across_suspend() {
    let _watchdog = Watchdog::arm(TEST_LIMIT);
    let (d, gateway) = start_with_gateway();
    let id = create(&d, "{}");
    let serve = "mkdir -p /www && echo hello-from-the-guest > /www/index.html && \
                 head -c 1048576 /dev/urandom > /www/big && md5sum /www/big > /www/big.md5 && \
                 exec httpd -f -p 127.0.0.1:8000 -h /www";
    let (code, _, err) = d.capsule(&["exec", "--detach", &id, "--", "sh", "-c", serve]);
    assert_eq!(code, 0, "{err}");
    let address = expose(&d, &id, "8000");
    // Exposing again gives the same address.
    assert_eq!(expose(&d, &id, "8000"), address);
    let url = format!("http://{address}");
    assert_eq!(
        until_served(&format!("{url}/index.html")),
        b"hello-from-the-guest\n"
    );

    let (code, big) = curl(&format!("{url}/big"), &[]);
    assert_eq!((code, big.len()), (0, 1 << 20));
    let digest = Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(&big)?;
            child.wait_with_output()
        })
        .unwrap();
    let (_, guest_md5) = curl(&format!("{url}/big.md5"), &[]);
    assert_eq!(
        String::from_utf8_lossy(&digest.stdout)
            .split_whitespace()
            .next(),
        String::from_utf8_lossy(&guest_md5)
            .split_whitespace()
            .next(),
        "the megabyte changed on its way"
    );

    let (code, out, err) = d.capsule(&["port", &id, "--json"]);
    assert_eq!(code, 0, "{err}");
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed[0]["port"], 8000, "{listed}");
    assert_eq!(listed[0]["address"], address.as_str(), "{listed}");

    // The same server by preview host name, through the gateway.
    let host = format!("8000-{id}.localhost:{gateway}");
    assert_eq!(
        listed[0]["preview_url"],
        format!("http://{host}/").as_str(),
        "{listed}"
    );
    assert_eq!(
        preview(gateway, &host, "/index.html"),
        (200, "hello-from-the-guest\n".to_string())
    );
    let (status, body) = preview(gateway, &format!("9999-{id}.localhost"), "/");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("port_not_exposed"), "{body}");

    // Suspended: nothing listens; resumed: the same address serves again
    // (the guest's server was suspended with it).
    let (status, body) = d.call("POST", &format!("/v1/sandboxes/{id}/suspend"), None);
    assert_eq!(status, 200, "{body}");
    let (code, _) = curl(&format!("{url}/index.html"), &[]);
    assert_ne!(code, 0, "a suspended sandbox's port still answered");
    let (status, body) = preview(gateway, &host, "/index.html");
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("sandbox_not_running"), "{body}");
    let (status, body) = d.call("POST", &format!("/v1/sandboxes/{id}/resume"), None);
    assert_eq!(status, 200, "{body}");
    let (_, listed) = d.call("GET", &format!("/v1/sandboxes/{id}/ports"), None);
    assert_eq!(listed[0]["address"], address.as_str(), "{listed}");
    assert_eq!(
        until_served(&format!("{url}/index.html")),
        b"hello-from-the-guest\n"
    );

    let (code, _, err) = d.capsule(&["port", &id, "8000", "--rm"]);
    assert_eq!(code, 0, "{err}");
    let (code, _) = curl(&format!("{url}/index.html"), &[]);
    assert_ne!(code, 0, "an unexposed port still answered");
    let (status, body) = preview(gateway, &host, "/index.html");
    assert_eq!(status, 404, "{body}");
    let (code, _, err) = d.capsule(&["port", &id, "8000", "--rm"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("port_not_found"), "{err}");

    expose(&d, &id, "8000");
    let (status, _) = d.call("DELETE", &format!("/v1/sandboxes/{id}"), None);
    assert_eq!(status, 204);
    let (status, body) = d.call("GET", &format!("/v1/sandboxes/{id}/ports"), None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        serde_json::json!([]),
        "an ended sandbox keeps no ports"
    );
}
