//! Files through the agent in a real guest: a transfer far larger than
//! either side's memory bound onto the guest's ext4 disk and back, its
//! digest checked and both sides' peak memory printed, its rate set against
//! the same bytes as command output over the same vsock connection; and the
//! requests a file manager makes (list, stat, mkdir, rename, remove) on
//! names that are not UTF-8, with errors that name the path.

use std::io::Read;
use std::time::Instant;

use guest_agent::protocol::files::{FileKind, GuestPath, WriteFile};
use guest_agent::protocol::ErrorCode;
use sandbox::ClientError;

use super::*;

/// Far above both sides' bounds (1 MiB and 256 KiB windows), and what
/// the nested test host moves in well under its time limit.
const SIZE: u64 = 128 << 20;

/// The command-output baseline is a rate, not a bound: a quarter of the
/// file measures it as well and keeps the guest busy (and exposed to the
/// nested test host's resets) for a quarter of the time.
const STREAMED: u64 = SIZE / 4;

/// A byte stream of `left` bytes that no one holds in memory.
struct Pattern {
    left: u64,
    state: u64,
}

impl Read for Pattern {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.left as usize);
        for b in &mut buf[..n] {
            self.state = self.state.wrapping_mul(6364136223846793005).wrapping_add(1);
            *b = (self.state >> 56) as u8;
        }
        self.left -= n as u64;
        Ok(n)
    }
}

fn digest(mut r: impl Read) -> std::io::Result<(u64, u64)> {
    let mut buf = vec![0u8; 1 << 16];
    let (mut len, mut hash) = (0u64, 0xcbf29ce484222325u64);
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok((len, hash));
        }
        for b in &buf[..n] {
            hash = (hash ^ u64::from(*b)).wrapping_mul(0x100000001b3);
        }
        len += n as u64;
    }
}

fn peak_rss_kib(status: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn mib_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / took.as_secs_f64()
}

#[test]
fn a_file_much_larger_than_memory_streams_onto_the_guests_disk_and_back() {
    let _watchdog = Watchdog::arm(TEST_LIMIT);
    let (_dir, disk) = scratch_file("data.ext4", 512 << 20);
    let mkfs = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1"])
        .arg(&disk)
        .status()
        .expect("mkfs.ext4 (e2fsprogs) is needed");
    assert!(mkfs.success());
    // Room for the page cache: a guest short of memory fails vsock
    // writes for a while (the agent waits that out).
    let mut vm = boot(builder().memory_mib(512).disk(&disk, false));
    sh_ok(&mut vm, "mkdir -p /data && mount -t ext4 /dev/vda /data");
    // Peaks from here on (this process runs other tests too): writing 5
    // to clear_refs resets the peak to the current size.
    sh_ok(&mut vm, "echo 5 > /proc/1/clear_refs");
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let host_before = peak_rss_kib(&std::fs::read_to_string("/proc/self/status").unwrap());

    let sent = digest(Pattern {
        left: SIZE,
        state: 11,
    })
    .unwrap();
    let request = WriteFile {
        path: GuestPath::from("/data/big.bin"),
        mode: Some(0o600),
        ..Default::default()
    };
    let t = Instant::now();
    let mut source = Pattern {
        left: SIZE,
        state: 11,
    };
    let written = vm
        .agent()
        .and_then(|agent| Ok(agent.write_file(request, &mut source)?));
    let written = guest_ok_doing(&mut vm, "uploading", written);
    let upload = t.elapsed();
    assert_eq!(written, SIZE);
    let size = sh_ok(&mut vm, "stat -c '%s %a' /data/big.bin");
    assert_eq!(size.trim(), format!("{SIZE} 600"));

    let t = Instant::now();
    let got = vm.agent().and_then(|agent| {
        let download = agent.read_file(GuestPath::from("/data/big.bin"), 0, None)?;
        // A read error is the connection's: its cause is kept.
        digest(download).map_err(|e| {
            match e
                .into_inner()
                .map(|inner| inner.downcast::<sandbox::ClientError>())
            {
                Some(Ok(client)) => sandbox::Error::from(*client),
                Some(Err(other)) => sandbox::Error::from(ClientError::Lost(other.to_string())),
                None => sandbox::Error::from(ClientError::Lost("read failed".into())),
            }
        })
    });
    let got = guest_ok_doing(&mut vm, "downloading", got);
    let download = t.elapsed();
    assert_eq!(got, sent, "the download differs from what was uploaded");

    // The same number of bytes as a command's output on the same
    // connection: the agent protocol over vsock without the disk.
    let t = Instant::now();
    let raw = vm.agent().and_then(|agent| {
        let script = format!("head -c {STREAMED} /dev/zero");
        let mut handle = agent.exec(ExecRequest::new(["sh", "-c", &script]))?;
        let mut bytes = 0u64;
        loop {
            match handle.next_event()? {
                Some(ExecEvent::Stdout(d)) => bytes += d.len() as u64,
                Some(ExecEvent::Exit(_)) | None => return Ok(bytes),
                Some(_) => {}
            }
        }
    });
    let raw = guest_ok_doing(&mut vm, "streaming output", raw);
    let stream = t.elapsed();
    assert_eq!(raw, STREAMED);

    let agent_peak = peak_rss_kib(&sh_ok(&mut vm, "cat /proc/1/status"));
    let host_peak = peak_rss_kib(&std::fs::read_to_string("/proc/self/status").unwrap());
    eprintln!(
        "files: {} MiB up {:.1} MiB/s, down {:.1} MiB/s; command output over the same \
         connection {:.1} MiB/s (up/stream {:.2}, down/stream {:.2}); peak memory: agent {} KiB, \
         this process (the VM's memory included) grew {} KiB",
        SIZE >> 20,
        mib_per_s(SIZE, upload),
        mib_per_s(SIZE, download),
        mib_per_s(STREAMED, stream),
        mib_per_s(SIZE, upload) / mib_per_s(STREAMED, stream),
        mib_per_s(SIZE, download) / mib_per_s(STREAMED, stream),
        agent_peak,
        host_peak.saturating_sub(host_before),
    );
    // The agent holds its window and a chunk per stream: far below the
    // file. (This process runs the VM too, so its own growth includes the
    // guest's page cache; the daemon's is measured on its own in
    // daemon::files_stream_into_and_out_of_a_daemon_sandbox, the client's
    // in the agent's host-tier tests.)
    assert!(
        agent_peak < 16 << 10,
        "the agent's peak memory: {agent_peak} KiB"
    );
    sh_ok(&mut vm, "umount /data");
    stop(vm);
}

fn refused(e: ClientError) -> (ErrorCode, String) {
    match e {
        ClientError::Refused { code, message } => (code, message),
        other => panic!("expected a refusal, got {other}"),
    }
}

#[test]
fn a_file_manager_works_on_names_of_any_bytes_and_errors_name_the_path() {
    let _watchdog = Watchdog::arm(TEST_LIMIT);
    let mut vm = boot(builder());
    let agent = vm.agent().expect("agent");
    let odd = GuestPath(b"/tmp/work/caf\xe9".to_vec());
    agent.mkdir("/tmp/work/sub", true, Some(0o700)).unwrap();
    let put = |path: GuestPath, data: &[u8]| {
        let request = WriteFile {
            path,
            ..Default::default()
        };
        agent.write_file(request, &mut &data[..])
    };
    put(odd.clone(), b"latin-1").unwrap();
    put(GuestPath::from("/tmp/work/sub/a.txt"), b"a").unwrap();
    let listing = agent.list("/tmp/work", 100).unwrap();
    let names: Vec<_> = listing.entries.iter().map(|e| e.name.clone()).collect();
    assert_eq!(
        names,
        [GuestPath(b"caf\xe9".to_vec()), GuestPath::from("sub")]
    );
    assert_eq!(listing.entries[1].kind, FileKind::Dir);
    assert_eq!(listing.entries[1].mode, 0o700);
    let mut text = String::new();
    agent
        .read_file(odd.clone(), 0, None)
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    assert_eq!(text, "latin-1");
    agent.rename(odd, "/tmp/work/sub/b.txt").unwrap();
    assert_eq!(agent.stat("/tmp/work/sub/b.txt").unwrap().size, 7);
    let (code, message) = refused(agent.remove("/tmp/work", false).unwrap_err());
    assert_eq!(code, ErrorCode::DirectoryNotEmpty);
    assert!(message.contains("/tmp/work"), "{message}");
    agent.remove("/tmp/work", true).unwrap();
    let (code, message) = refused(agent.stat("/tmp/work/sub").unwrap_err());
    assert_eq!(code, ErrorCode::NotFound);
    assert!(message.contains("/tmp/work/sub"), "{message}");
    // The connection serves commands alongside.
    let out = agent
        .exec(ExecRequest::new(["ls", "/tmp"]))
        .unwrap()
        .output()
        .unwrap();
    assert!(out.status.success());
    stop(vm);
}
