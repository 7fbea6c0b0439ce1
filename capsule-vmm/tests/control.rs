//! Host tier: a real `capsule-vmm` child driven through its control
//! protocol. Its VM is built and snapshotted but never run (this host's
//! KVM may be PVM, where an ordinary guest kernel cannot run): boot,
//! events, snapshot, restore in a second child, kill; and requests that
//! are wrong or hostile, which get an error and change nothing.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use capsule_vmm::channel::Channel;
use capsule_vmm::client::{self, ChildClient, ClientError};
use capsule_vmm::protocol::{
    from_hex, to_hex, Answer, BootSpec, Event, ExitReason, FailureCode, FromChild, Op, RestoreSpec,
    VmState,
};

const WAIT: Duration = Duration::from_secs(30);

fn kernel() -> PathBuf {
    std::env::var_os("CAPSULE_KERNEL")
        .map(PathBuf::from)
        .expect("set CAPSULE_KERNEL to a guest kernel (`make test` does)")
}

fn private_dir(parent: &Path, name: &str) -> PathBuf {
    let dir = parent.join(name);
    vmm::private::ensure_private_dir(&dir).unwrap();
    dir
}

struct Child {
    process: std::process::Child,
    client: Option<ChildClient>,
    dir: PathBuf,
}

impl Child {
    fn client(&mut self) -> &mut ChildClient {
        self.client.as_mut().expect("connected")
    }
}

impl Drop for Child {
    /// A failed test leaves no child behind.
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

fn start(dir: &Path) -> Child {
    let (mut cmd, channel) =
        client::command(Path::new(env!("CARGO_BIN_EXE_capsule-vmm")), dir).expect("command");
    cmd.stderr(std::process::Stdio::inherit());
    let (process, client) = client::spawn(cmd, channel).expect("the child says hello");
    Child {
        process,
        client: Some(client),
        dir: dir.to_path_buf(),
    }
}

fn boot_spec(disks: usize) -> BootSpec {
    BootSpec {
        cpus: 1,
        memory_mib: 64,
        initramfs: false,
        disks: (0..disks)
            .map(|i| capsule_vmm::protocol::DiskSpec {
                name: format!("disk{i}.img").into(),
                read_only: false,
                flush: Default::default(),
            })
            .collect(),
        cmdline: vec!["capsule.test=1".into()],
        verbose_console: false,
    }
}

fn refused_with(client: &mut ChildClient, op: Op, fds: &[std::os::fd::BorrowedFd]) -> FailureCode {
    match client.call(op, fds, WAIT) {
        Err(ClientError::Failed(f)) => f.code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_child_boots_snapshots_and_its_snapshot_restores_in_another() {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = start(&private_dir(tmp.path(), "a"));
    // Nothing to do before a VM exists.
    assert_eq!(
        refused_with(a.client(), Op::Resume, &[]),
        FailureCode::WrongState
    );
    let info = match a.client().call(Op::Info, &[], WAIT).unwrap() {
        Answer::Info(info) => info,
        other => panic!("{other:?}"),
    };
    assert_eq!((info.state, info.pid), (None, a.process.id()));

    let kernel = File::open(kernel()).unwrap();
    let disk_path = tmp.path().join("disk0.img");
    std::fs::write(&disk_path, vec![0u8; 1 << 20]).unwrap();
    let disk = File::options()
        .read(true)
        .write(true)
        .open(&disk_path)
        .unwrap();
    // Too few descriptors: refused, and a VM can still be booted after.
    assert_eq!(
        refused_with(a.client(), Op::Boot(boot_spec(1)), &[kernel.as_fd()]),
        FailureCode::BadRequest
    );
    let built = a
        .client()
        .call(
            Op::Boot(boot_spec(1)),
            &[kernel.as_fd(), disk.as_fd()],
            WAIT,
        )
        .unwrap();
    assert!(matches!(built, Answer::Built { .. }), "{built:?}");
    assert_eq!(a.client().next_event(WAIT).unwrap(), Some(Event::Ready));
    assert!(
        a.dir.join("vsock.sock").exists(),
        "the vsock device listens"
    );
    // A second VM in the same child is refused.
    assert_eq!(
        refused_with(a.client(), Op::Boot(boot_spec(0)), &[kernel.as_fd()]),
        FailureCode::WrongState
    );

    a.client()
        .call(
            Op::SetAnnotation {
                hex: to_hex(b"sandbox record"),
            },
            &[],
            WAIT,
        )
        .unwrap();
    assert_eq!(
        refused_with(a.client(), Op::SetAnnotation { hex: "zz".into() }, &[]),
        FailureCode::BadRequest
    );
    let snap = tmp.path().join("snap");
    let taken = a
        .client()
        .call(
            Op::Snapshot {
                dir: snap.clone(),
                diff: false,
            },
            &[],
            WAIT,
        )
        .unwrap();
    let Answer::Snapshot { external_files, .. } = taken else {
        panic!("{taken:?}")
    };
    assert_eq!(external_files, vec![PathBuf::from("disk0.img")]);
    assert_eq!(
        a.client().next_event(WAIT).unwrap(),
        Some(Event::SnapshotWritten { dir: snap.clone() })
    );

    // A later supervisor reaches the same child through its socket and
    // hears its events too.
    let mut later = ChildClient::connect(&a.dir, WAIT).unwrap();
    let Answer::Info(info) = later.call(Op::Info, &[], WAIT).unwrap() else {
        panic!()
    };
    assert_eq!(info.state, Some(VmState::Paused));
    assert_eq!(from_hex(&info.annotation_hex).unwrap(), b"sandbox record");

    // The snapshot restores in a second child, over the disk named again.
    let mut b = start(&private_dir(tmp.path(), "b"));
    let restore = RestoreSpec {
        snapshot: snap.clone(),
        disks: vec!["disk0.img".into()],
        track_dirty: false,
        memory: Default::default(),
        flush: Default::default(),
    };
    assert_eq!(
        refused_with(b.client(), Op::Restore(restore.clone()), &[]),
        FailureCode::BadRequest,
        "the disk must be named again"
    );
    let disk_again = File::open(&disk_path).unwrap();
    let built = b
        .client()
        .call(Op::Restore(restore), &[disk_again.as_fd()], WAIT)
        .unwrap();
    let Answer::Built {
        annotation_hex,
        timings,
    } = built
    else {
        panic!("{built:?}")
    };
    assert_eq!(from_hex(&annotation_hex).unwrap(), b"sandbox record");
    assert!(
        timings.iter().any(|(phase, _)| phase.contains("memory")),
        "{timings:?}"
    );

    // Killed: every connection hears why, and the child exits.
    a.client().call(Op::Kill, &[], WAIT).unwrap();
    assert_eq!(
        a.client().wait_exit(WAIT).unwrap(),
        Some(ExitReason::Stopped)
    );
    assert_eq!(later.wait_exit(WAIT).unwrap(), Some(ExitReason::Stopped));
    assert!(a.process.wait().unwrap().success());
    assert!(!a.dir.join("control.sock").exists(), "the child cleaned up");
    b.client().call(Op::Kill, &[], WAIT).unwrap();
    assert!(b.process.wait().unwrap().success());
}

#[test]
fn hostile_messages_get_errors_and_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = start(&private_dir(tmp.path(), "c"));
    let mut raw = ChildClient::connect(&c.dir, WAIT).unwrap();
    // Garbage, a request of the wrong shape, an unknown op, descriptors
    // with a request that takes none: each answered with an error.
    let sock = connect_raw(&c.dir);
    sock.send(&serde_json::json!("not a request"), &[]).unwrap();
    let (reply, _) = sock.recv::<FromChild>().unwrap();
    assert!(matches!(reply, FromChild::Hello { .. }), "{reply:?}");
    let (reply, _) = sock.recv::<FromChild>().unwrap();
    let FromChild::Reply { result: Err(f), .. } = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(f.code, FailureCode::BadRequest);
    sock.send(
        &serde_json::json!({"id": 5, "op": {"op": "format_the_disk"}}),
        &[],
    )
    .unwrap();
    let (reply, _) = sock.recv::<FromChild>().unwrap();
    assert!(
        matches!(reply, FromChild::Reply { result: Err(_), .. }),
        "{reply:?}"
    );
    let f = File::open("/dev/null").unwrap();
    assert_eq!(
        refused_with(&mut raw, Op::Pause, &[f.as_fd()]),
        FailureCode::BadRequest
    );
    // More descriptors than a message may carry: the connection is
    // dropped and none of them stays open in the child.
    let fd_count = || {
        std::fs::read_dir(format!("/proc/{}/fd", c.process.id()))
            .unwrap()
            .count()
    };
    let before = fd_count();
    let flood = connect_raw(&c.dir);
    let _hello = flood.recv::<FromChild>().unwrap();
    send_with_fds(&flood, br#"{"id":1,"op":{"op":"info"}}"#, 40);
    assert!(
        matches!(
            flood.recv::<FromChild>(),
            Err(capsule_vmm::channel::ChannelError::Closed)
        ),
        "the flooding connection is dropped"
    );
    drop(flood);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        fd_count(),
        before,
        "no descriptor of the flood stays open in the child"
    );
    // The child still works for everyone.
    assert!(matches!(
        c.client().call(Op::Info, &[], WAIT),
        Ok(Answer::Info(_))
    ));
    // With no VM, the child goes once its last connection does.
    drop((raw, sock));
    c.client = None;
    assert!(c.process.wait().unwrap().success());
}

fn connect_raw(dir: &Path) -> Channel {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    connect(
        fd.as_raw_fd(),
        &UnixAddr::new(&dir.join("control.sock")).unwrap(),
    )
    .unwrap();
    let ch = Channel::from_fd(fd);
    ch.set_read_timeout(Some(WAIT)).unwrap();
    ch
}

/// Sends `bytes` with `n` descriptors (of /dev/null) attached, past the
/// channel's own limit, as a hostile peer would.
fn send_with_fds(channel: &Channel, bytes: &[u8], n: usize) {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
    use std::os::fd::AsRawFd;
    let null = File::open("/dev/null").unwrap();
    let fds: Vec<_> = (0..n).map(|_| null.try_clone().unwrap()).collect();
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let iov = [std::io::IoSlice::new(bytes)];
    sendmsg::<UnixAddr>(
        channel.as_fd().as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&raw)],
        MsgFlags::empty(),
        None,
    )
    .unwrap();
}
