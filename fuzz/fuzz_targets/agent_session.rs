//! The host client in a whole session with a hostile agent: after a valid
//! hello, the agent's side sends the fuzzer's bytes while the host runs an
//! exec, collects its output and pings. Nothing may panic or hang (every
//! wait here is bounded), whatever arrives.
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use guest_agent::protocol::{Frame, FrameKind, Hello};
use guest_agent::{AgentClient, ClientOptions, ExecRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (host, mut agent) = UnixStream::pair().unwrap();
    let hello = Frame::json(FrameKind::Hello, 0, &Hello::new("fuzz", 1 << 16, 8));
    agent.write_all(&hello.encode().unwrap()).unwrap();
    let bytes = data.to_vec();
    let mut reader = agent.try_clone().unwrap();
    // Drain what the host sends, so its writes never stall on us.
    let drain = std::thread::spawn(move || {
        let mut sink = [0u8; 4096];
        while matches!(reader.read(&mut sink), Ok(n) if n > 0) {}
    });
    let feeder = std::thread::spawn(move || {
        let _ = agent.write_all(&bytes);
        let _ = agent.shutdown(std::net::Shutdown::Write);
        agent
    });
    let options = ClientOptions {
        keepalive_interval: Duration::from_millis(50),
        keepalive_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_millis(500),
        exec_grace: Duration::from_millis(100),
        output_limit: 1 << 20,
        ..ClientOptions::default()
    };
    let Ok(client) =
        AgentClient::connect_with(host, Instant::now() + Duration::from_secs(1), options)
    else {
        return;
    };
    if let Ok(handle) = client.exec(ExecRequest {
        timeout_ms: Some(100),
        ..ExecRequest::new(["fuzz"])
    }) {
        let _ = handle.output();
    }
    let _ = client.ping(Duration::from_millis(100));
    let agent = feeder.join().unwrap();
    drop(client);
    let _ = agent.shutdown(std::net::Shutdown::Both);
    drain.join().unwrap();
});
