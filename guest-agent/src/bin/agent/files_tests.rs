//! The agent's file requests against the real host client over a
//! socketpair, on this machine's file system: round trips keeping mode,
//! owner and time, paths that are not UTF-8 or too long, errors that name
//! the path, writes that never go through a symlink and leave the old file
//! whole when they fail, and transfers far larger than either side's
//! memory bound.

use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use guest_agent::protocol::files::{FileKind, GuestPath, WriteFile};
use guest_agent::protocol::ErrorCode;
use guest_agent::{AgentClient, ClientError};

use super::tests::connect;

fn gp(path: &Path) -> GuestPath {
    GuestPath(path.as_os_str().as_bytes().to_vec())
}

fn code(e: ClientError) -> (ErrorCode, String) {
    match e {
        ClientError::Refused { code, message } => (code, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn put(client: &AgentClient, path: &Path, data: &[u8]) -> Result<u64, ClientError> {
    let req = WriteFile {
        path: gp(path),
        ..Default::default()
    };
    client.write_file(req, &mut &data[..])
}

fn get(client: &AgentClient, path: &Path) -> Result<Vec<u8>, ClientError> {
    let mut out = Vec::new();
    let mut download = client.read_file(gp(path), 0, None)?;
    download
        .read_to_end(&mut out)
        .map_err(|e| ClientError::Lost(e.to_string()))?;
    Ok(out)
}

fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("capsule-write"))
        .collect()
}

#[test]
fn a_file_round_trips_with_its_mode_owner_and_time() {
    let client = connect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/a.txt");
    // Any owner as root (as CI runs), one's own otherwise.
    let me = std::fs::metadata("/proc/self").unwrap();
    let (uid, gid) = (me.uid(), me.gid());
    let (uid, gid) = if uid == 0 { (1234, 5678) } else { (uid, gid) };
    let req = WriteFile {
        path: gp(&path),
        mode: Some(0o640),
        uid: Some(uid),
        gid: Some(gid),
        mtime_ns: Some(1_600_000_000_123_456_789),
        parents: true,
    };
    assert_eq!(client.write_file(req, &mut &b"hello\n"[..]).unwrap(), 6);
    assert_eq!(get(&client, &path).unwrap(), b"hello\n");
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
    assert_eq!((meta.uid(), meta.gid()), (uid, gid));
    let info = client.stat(gp(&path)).unwrap();
    assert_eq!(info.kind, FileKind::File);
    assert_eq!((info.size, info.mode), (6, 0o640));
    assert_eq!(info.mtime_ns, 1_600_000_000_123_456_789);
    assert_eq!(info.name, GuestPath::from("a.txt"));

    // Overwriting keeps what the request does not set.
    put(&client, &path, b"second").unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
    assert_eq!((meta.uid(), meta.gid()), (uid, gid));

    // A range of it.
    let mut part = String::new();
    client
        .read_file(gp(&path), 2, Some(3))
        .unwrap()
        .read_to_string(&mut part)
        .unwrap();
    assert_eq!(part, "con");

    client
        .mkdir(gp(&dir.path().join("d/e")), true, None)
        .unwrap();
    client
        .rename(gp(&path), gp(&dir.path().join("d/e/b.txt")))
        .unwrap();
    let listing = client.list(gp(&dir.path().join("d/e")), 100).unwrap();
    let names: Vec<_> = listing.entries.iter().map(|e| e.name.display()).collect();
    assert_eq!(names, ["b.txt"]);
    assert!(!listing.more);
    client.remove(gp(&dir.path().join("d")), true).unwrap();
    assert!(!dir.path().join("d").exists());
    assert!(temp_files(&dir.path().join("sub")).is_empty());
}

#[test]
fn names_that_are_not_utf8_or_are_long_are_handled_and_errors_name_the_path() {
    let client = connect();
    let dir = tempfile::tempdir().unwrap();
    let latin1 = dir.path().join(std::ffi::OsStr::from_bytes(b"caf\xe9"));
    put(&client, &latin1, b"x").unwrap();
    let listing = client.list(gp(dir.path()), 10).unwrap();
    assert_eq!(listing.entries[0].name, GuestPath(b"caf\xe9".to_vec()));
    // Through JSON and back.
    let json = serde_json::to_string(&listing.entries[0].name).unwrap();
    assert!(json.contains("b64"), "{json}");
    assert_eq!(get(&client, &latin1).unwrap(), b"x");

    let longest = dir.path().join("n".repeat(255));
    put(&client, &longest, b"ok").unwrap();
    let too_long = dir.path().join("n".repeat(256));
    assert_eq!(
        code(put(&client, &too_long, b"no").unwrap_err()).0,
        ErrorCode::NameTooLong
    );

    let missing = dir.path().join("missing/file");
    let (c, message) = code(get(&client, &missing).unwrap_err());
    assert_eq!(c, ErrorCode::NotFound);
    assert!(message.contains("missing/file"), "{message}");
    assert_eq!(
        code(put(&client, &missing, b"no").unwrap_err()).0,
        ErrorCode::NotFound
    );
    assert_eq!(
        code(get(&client, dir.path()).unwrap_err()).0,
        ErrorCode::IsADirectory
    );
    assert_eq!(
        code(client.remove(gp(dir.path()), false).unwrap_err()).0,
        ErrorCode::DirectoryNotEmpty
    );
    assert_eq!(
        code(client.mkdir(gp(dir.path()), false, None).unwrap_err()).0,
        ErrorCode::AlreadyExists
    );
    assert_eq!(
        code(client.stat(GuestPath::from("relative/path")).unwrap_err()).0,
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(client.stat(GuestPath(b"/a\0b".to_vec())).unwrap_err()).0,
        ErrorCode::BadRequest
    );
    let huge = GuestPath(format!("/{}", "a/".repeat(3000)).into_bytes());
    assert_eq!(
        code(client.stat(huge).unwrap_err()).0,
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(client.remove(GuestPath::from("/"), true).unwrap_err()).0,
        ErrorCode::BadRequest
    );
    // `..` is resolved by the guest's kernel like any path.
    let dotted = dir.path().join("x/../caf");
    std::fs::create_dir(dir.path().join("x")).unwrap();
    put(&client, &dotted, b"dots").unwrap();
    assert_eq!(std::fs::read(dir.path().join("caf")).unwrap(), b"dots");
}

#[test]
fn a_write_replaces_a_symlink_instead_of_following_it_and_a_failed_one_changes_nothing() {
    let client = connect();
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    assert_eq!(client.stat(gp(&link)).unwrap().kind, FileKind::Symlink);
    assert_eq!(client.stat(gp(&link)).unwrap().target, Some(gp(&victim)));
    put(&client, &link, b"new").unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(std::fs::symlink_metadata(&link).unwrap().is_file());

    // A source that fails part way: the old file stays whole, no
    // temporary file is left behind, and the connection still works.
    struct Failing(usize);
    impl Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0 == 0 {
                return Err(std::io::Error::other("the source broke"));
            }
            let n = buf.len().min(self.0);
            buf[..n].fill(b'z');
            self.0 -= n;
            Ok(n)
        }
    }
    let req = WriteFile {
        path: gp(&victim),
        ..Default::default()
    };
    let err = client.write_file(req, &mut Failing(1 << 20)).unwrap_err();
    assert!(matches!(err, ClientError::Source(_)), "{err:?}");
    client.ping(std::time::Duration::from_secs(5)).unwrap();
    // The agent drops the temporary file once it sees the reset.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !temp_files(dir.path()).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(temp_files(dir.path()).is_empty());
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
}

#[test]
fn a_long_directory_is_listed_in_pages_in_name_order() {
    let client = connect();
    let dir = tempfile::tempdir().unwrap();
    for i in 0..1500 {
        std::fs::write(dir.path().join(format!("f{i:05}")), b"").unwrap();
    }
    let page = client.list_page(gp(dir.path()), None, Some(100)).unwrap();
    assert_eq!(page.entries.len(), 100);
    assert!(page.more);
    let all = client.list(gp(dir.path()), 100_000).unwrap();
    assert_eq!(all.entries.len(), 1500);
    assert!(!all.more);
    let names: Vec<_> = all.entries.iter().map(|e| e.name.display()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    let capped = client.list(gp(dir.path()), 1000).unwrap();
    assert_eq!(capped.entries.len(), 1000);
    assert!(capped.more);
}

/// Peak resident memory of this process (each test runs in its own under
/// nextest), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// A byte stream of `len` bytes that no one holds in memory.
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

fn digest(mut r: impl Read) -> (u64, u64) {
    let mut buf = vec![0u8; 1 << 16];
    let (mut len, mut hash) = (0u64, 0xcbf29ce484222325u64);
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            return (len, hash);
        }
        for b in &buf[..n] {
            hash = (hash ^ u64::from(*b)).wrapping_mul(0x100000001b3);
        }
        len += n as u64;
    }
}

#[test]
fn a_transfer_much_larger_than_the_memory_bound_streams_through() {
    const SIZE: u64 = 256 << 20;
    let client = connect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big");
    // Writing 5 resets the peak to the current size.
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let before = peak_rss();
    let sent = digest(Pattern {
        left: SIZE,
        state: 7,
    });
    let req = WriteFile {
        path: gp(&path),
        ..Default::default()
    };
    let mut source = Pattern {
        left: SIZE,
        state: 7,
    };
    assert_eq!(client.write_file(req, &mut source).unwrap(), SIZE);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), SIZE);
    let download = client.read_file(gp(&path), 0, None).unwrap();
    assert_eq!(download.size(), SIZE);
    assert_eq!(digest(download), sent);
    let grown = peak_rss().saturating_sub(before);
    // Both ends live in this process: each holds its window (1 MiB and
    // 256 KiB) and a chunk or two, nowhere near the file.
    assert!(grown < 32 << 20, "peak memory grew by {grown} bytes");
}

#[test]
fn a_tree_round_trips_with_modes_symlinks_and_odd_names() {
    use std::os::unix::fs::symlink;
    let client = connect();
    let src = tempfile::tempdir().unwrap();
    let root = src.path();
    std::fs::create_dir_all(root.join("a/b")).unwrap();
    std::fs::write(root.join("a/b/run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(root.join("a/b/run.sh"), PermissionsExt::from_mode(0o751)).unwrap();
    std::fs::write(root.join(std::ffi::OsStr::from_bytes(b"caf\xe9")), b"odd").unwrap();
    symlink("b/run.sh", root.join("a/relative")).unwrap();
    symlink("/etc/hostname", root.join("absolute")).unwrap();
    std::fs::set_permissions(root.join("a"), PermissionsExt::from_mode(0o710)).unwrap();

    let mut archive = Vec::new();
    client
        .read_tree(gp(root))
        .unwrap()
        .read_to_end(&mut archive)
        .unwrap();
    let dst = tempfile::tempdir().unwrap();
    let into = dst.path().join("copy");
    let n = client.write_tree(gp(&into), &mut &archive[..]).unwrap();
    assert_eq!(n, archive.len() as u64);

    let mode = |p: &str| std::fs::symlink_metadata(into.join(p)).unwrap().mode() & 0o7777;
    assert_eq!(
        std::fs::read(into.join("a/b/run.sh")).unwrap(),
        b"#!/bin/sh\necho hi\n"
    );
    assert_eq!(mode("a/b/run.sh"), 0o751);
    assert_eq!(mode("a"), 0o710);
    assert_eq!(
        std::fs::read_link(into.join("a/relative")).unwrap(),
        Path::new("b/run.sh")
    );
    assert_eq!(
        std::fs::read_link(into.join("absolute")).unwrap(),
        Path::new("/etc/hostname")
    );
    assert_eq!(
        std::fs::read(into.join(std::ffi::OsStr::from_bytes(b"caf\xe9"))).unwrap(),
        b"odd"
    );
    let (c, _) = code(client.read_tree(gp(&into.join("absolute/x"))).unwrap_err());
    assert!(
        matches!(c, ErrorCode::NotADirectory | ErrorCode::NotFound),
        "{c:?}"
    );
}

/// A tar entry named `name` holding `data`, its name written raw so the
/// tar crate's own checks on names do not stop a hostile one.
fn raw_entry(name: &[u8], kind: tar::EntryType, link: &[u8], data: &[u8]) -> Vec<u8> {
    let mut header = tar::Header::new_old();
    header.as_old_mut().name[..name.len()].copy_from_slice(name);
    header.as_old_mut().linkname[..link.len()].copy_from_slice(link);
    header.set_entry_type(kind);
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    let mut out = header.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

#[test]
fn a_hostile_archive_writes_nothing_outside_its_directory() {
    let client = connect();
    let base = tempfile::tempdir().unwrap();
    let outside = base.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let into = base.path().join("into");

    let mut dotdot = raw_entry(b"../outside/escaped", tar::EntryType::Regular, b"", b"x");
    dotdot.extend_from_slice(&[0; 1024]);
    // The tar crate skips such an entry rather than failing.
    let _ = client.write_tree(gp(&into), &mut &dotdot[..]);
    assert!(!outside.join("escaped").exists());

    let mut through_link = raw_entry(
        b"link",
        tar::EntryType::Symlink,
        outside.as_os_str().as_bytes(),
        b"",
    );
    through_link.extend(raw_entry(
        b"link/planted",
        tar::EntryType::Regular,
        b"",
        b"x",
    ));
    through_link.extend_from_slice(&[0; 1024]);
    let result = client.write_tree(gp(&into), &mut &through_link[..]);
    assert!(result.is_err(), "{result:?}");
    assert!(!outside.join("planted").exists());

    // Garbage is an error, and the connection carries on.
    let result = client.write_tree(gp(&into), &mut &[0xa5u8; 4096][..]);
    assert!(result.is_err(), "{result:?}");
    client.ping(std::time::Duration::from_secs(5)).unwrap();
}

#[test]
fn a_watch_reports_create_write_and_remove_in_order_and_ends_with_its_directory() {
    use guest_agent::protocol::files::WatchKind;
    let client = connect();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("watched");
    std::fs::create_dir(&root).unwrap();
    let mut watch = client.watch(gp(&root), true).unwrap();
    let file = root.join("f.txt");
    std::fs::write(&file, b"a").unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&file)
        .unwrap()
        .write_all(b"b")
        .unwrap();
    // A directory made after the watch began is watched too.
    std::fs::create_dir(root.join("sub")).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    std::fs::write(root.join("sub/inner"), b"x").unwrap();
    std::fs::rename(&file, root.join("g.txt")).unwrap();
    std::fs::remove_file(root.join("g.txt")).unwrap();

    let mut seen = Vec::new();
    let wanted = [
        (WatchKind::Create, "f.txt"),
        (WatchKind::Write, "f.txt"),
        (WatchKind::Create, "sub"),
        (WatchKind::Create, "sub/inner"),
        (WatchKind::RenameFrom, "f.txt"),
        (WatchKind::RenameTo, "g.txt"),
        (WatchKind::Remove, "g.txt"),
    ];
    let relative = |e: &guest_agent::protocol::files::WatchEvent| {
        Path::new(std::ffi::OsStr::from_bytes(e.path.as_bytes()))
            .strip_prefix(&root)
            .unwrap()
            .to_string_lossy()
            .into_owned()
    };
    while seen.len() < 40 {
        let e = watch
            .next_event(Some(std::time::Duration::from_secs(5)))
            .unwrap()
            .unwrap();
        seen.push((e.kind, relative(&e)));
        if e.kind == WatchKind::Remove {
            break;
        }
    }
    // In order, with nothing but chmods and repeated writes between.
    let mut want = wanted.iter().peekable();
    for (kind, path) in &seen {
        if want.peek().is_some_and(|(k, p)| k == kind && p == path) {
            want.next();
        } else {
            assert!(
                matches!(kind, WatchKind::Chmod | WatchKind::Write),
                "unexpected {kind:?} {path} in {seen:?}"
            );
        }
    }
    assert!(
        want.peek().is_none(),
        "missing {:?} in {seen:?}",
        want.peek()
    );

    // Nothing happens: the wait times out and the watch carries on.
    let quiet = watch.next_event(Some(std::time::Duration::from_millis(200)));
    assert!(matches!(quiet, Err(ClientError::Timeout)), "{quiet:?}");
    std::fs::remove_dir_all(&root).unwrap();
    let ended = loop {
        match watch.next_event(Some(std::time::Duration::from_secs(5))) {
            Ok(Some(_)) => continue,
            other => break other,
        }
    };
    assert_eq!(code(ended.unwrap_err()).0, ErrorCode::NotFound);
    assert!(client.watch(gp(&root), false).is_err());
}

fn sh_request(script: &str) -> guest_agent::ExecRequest {
    guest_agent::ExecRequest::new(["sh", "-c", script])
}

/// Everything an attach reads until its end: (stdout, stderr, end).
fn drain(mut attach: guest_agent::AttachHandle) -> (Vec<u8>, Vec<u8>, guest_agent::LogEvent) {
    use guest_agent::LogEvent;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    loop {
        match attach
            .next_event(Some(std::time::Duration::from_secs(10)))
            .unwrap()
            .unwrap()
        {
            LogEvent::Stdout { bytes, .. } => out.extend(bytes),
            LogEvent::Stderr { bytes, .. } => err.extend(bytes),
            end @ LogEvent::End { .. } => return (out, err, end),
        }
    }
}

#[test]
fn a_detached_process_outlives_its_client_and_is_read_from_any_offset() {
    use guest_agent::LogEvent;
    let pid = {
        let client = connect();
        let pid = client
            .spawn(sh_request(
                "for i in 1 2 3; do echo line$i; sleep 0.2; done; echo oops >&2; exit 4",
            ))
            .unwrap();
        // Read part of it, then the client goes away mid-output.
        let mut attach = client.attach(pid, 0, true).unwrap();
        let first = attach
            .next_event(Some(std::time::Duration::from_secs(10)))
            .unwrap()
            .unwrap();
        assert_eq!(
            first,
            LogEvent::Stdout {
                offset: 0,
                bytes: b"line1\n".to_vec()
            }
        );
        pid
    };
    let client = connect();
    // From the start, following to its exit: nothing lost.
    let (out, err, end) = drain(client.attach(pid, 0, true).unwrap());
    assert_eq!(out, b"line1\nline2\nline3\n");
    assert_eq!(err, b"oops\n");
    let LogEvent::End { next_offset, exit } = end else {
        unreachable!()
    };
    assert_eq!(next_offset, 23);
    assert_eq!(exit.unwrap().code, Some(4));
    // From the middle of a line.
    let (out, _, _) = drain(client.attach(pid, 8, false).unwrap());
    assert_eq!(out, b"ne2\nline3\n");
    let listed = client.processes().unwrap();
    let me = listed.iter().find(|p| p.pid == pid).unwrap();
    assert_eq!((me.output_bytes, me.kept_from), (23, 0));
    assert_eq!(me.exit.unwrap().code, Some(4));

    // A quiet one, signalled; an attach without follow ends at once.
    let sleeper = client.spawn(sh_request("sleep 100")).unwrap();
    let (_, _, end) = drain(client.attach(sleeper, 0, false).unwrap());
    assert_eq!(
        end,
        LogEvent::End {
            next_offset: 0,
            exit: None
        }
    );
    client.signal_process(sleeper, libc::SIGTERM).unwrap();
    let (_, _, end) = drain(client.attach(sleeper, 0, true).unwrap());
    let LogEvent::End { exit, .. } = end else {
        unreachable!()
    };
    assert_eq!(exit.unwrap().signal, Some(libc::SIGTERM));
    assert_eq!(
        code(client.attach(999_999, 0, true).unwrap_err()).0,
        ErrorCode::NoSuchProcess
    );
}

#[test]
fn a_detached_process_that_floods_keeps_only_its_newest_output() {
    use guest_agent::protocol::DETACHED_LOG_BYTES;
    let client = connect();
    let pid = client
        .spawn(sh_request("head -c 20000000 /dev/zero; echo end"))
        .unwrap();
    // Nobody reads while it writes: it is never held up.
    let (_, _, end) = drain(client.attach(pid, 0, true).unwrap());
    assert!(matches!(end, guest_agent::LogEvent::End { exit: Some(s), .. } if s.code == Some(0)));
    let attach = client.attach(pid, 0, false).unwrap();
    let from = attach.from();
    let (out, _, _) = drain(attach);
    assert!(from >= 20_000_004 - DETACHED_LOG_BYTES, "kept from {from}");
    assert!(out.len() as u64 <= DETACHED_LOG_BYTES);
    assert!(out.ends_with(b"\0end\n"));
}

/// An echo server on this machine's loopback that answers each line in
/// upper case; its port.
fn upper_case_server() -> u16 {
    use std::io::{BufRead, BufReader};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            std::thread::spawn(move || {
                let mut out = conn.try_clone().unwrap();
                for line in BufReader::new(conn).split(b'\n') {
                    let Ok(mut line) = line else { return };
                    line.make_ascii_uppercase();
                    line.push(b'\n');
                    if out.write_all(&line).is_err() {
                        return;
                    }
                }
                // The client's end of file: answer with ours.
            });
        }
    });
    port
}

#[test]
fn a_port_in_the_guest_is_reached_through_the_agent_both_ways() {
    let client = connect();
    let port = upper_case_server();
    let mut conn = client.connect_port(port).unwrap();
    let mut writer = conn.writer();
    writer.write_all(b"hello\n").unwrap();
    let mut got = [0u8; 6];
    conn.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"HELLO\n");

    // Much more than either window, both ways at once; memory stays flat.
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let before = peak_rss();
    let line = vec![b'a'; 1023];
    let lines = 16 * 1024;
    let sender = std::thread::spawn(move || {
        for _ in 0..lines {
            writer.write_all(&line).unwrap();
            writer.write_all(b"\n").unwrap();
        }
        writer.shutdown().unwrap();
    });
    let mut total = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = conn.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        assert!(buf[..n].iter().all(|b| *b == b'A' || *b == b'\n'));
        total += n;
    }
    sender.join().unwrap();
    assert_eq!(total, 16 << 20);
    let grown = peak_rss().saturating_sub(before);
    assert!(grown < 32 << 20, "peak memory grew by {grown} bytes");

    // Nothing listens: refused with a code.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    assert_eq!(
        code(client.connect_port(closed).unwrap_err()).0,
        ErrorCode::ConnectionRefused
    );
    client.ping(std::time::Duration::from_secs(5)).unwrap();
}
