//! `capsule shell` driven through a real terminal: tmux runs the CLI in a
//! pane, `send-keys` types, `capture-pane` reads the screen. The shell in
//! the sandbox sees the pane's size and its change, Ctrl-C stops the
//! foreground job and not the shell, a full-screen program draws and
//! quits, the CLI exits with the shell's status and leaves the local
//! terminal as it found it.

use std::path::Path;
use std::process::Command;

use super::daemon::{create, start, Daemon};
use super::*;

/// A tmux server of the test's own (its socket in a temporary
/// directory), killed on drop.
struct Tmux {
    socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmux {
    fn new() -> Tmux {
        let dir = tempfile::tempdir().unwrap();
        Tmux {
            socket: dir.path().join("tmux.sock"),
            _dir: dir,
        }
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(["-f", "/dev/null"])
            .args(args)
            .env("TERM", "xterm-256color")
            .output()
            .expect("tmux is needed (apt-get install tmux)");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "t"];
        args.extend_from_slice(keys);
        self.run(&args);
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "t"])
    }

    /// Waits until the screen shows `want` (a line that has it, counted
    /// from the bottom, so an older match does not count twice).
    fn wait_for(&self, want: &str, occurrences: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let screen = self.screen();
            if screen.matches(want).count() >= occurrences {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "the screen never showed {want:?} {occurrences} times:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .arg("kill-server")
            .output();
    }
}

fn shell_in_tmux(d: &Daemon, id: &str) -> Tmux {
    let tmux = Tmux::new();
    let capsule = env!("CARGO_BIN_EXE_capsule");
    let home = d.capsule_home();
    // After the session: its status, and whether the local terminal is
    // back in canonical mode with echo.
    let script = format!(
        "CAPSULE_HOME={home} {capsule} shell {id}; echo shell-exit=$?; \
         echo \"modes: $(stty -a | tr ' ' '\\n' | grep -x -e icanon -e -icanon -e echo -e -echo \
         | tr '\\n' ' ')|modes-end\"; sleep 600",
        home = home.display()
    );
    assert!(Path::new(capsule).exists());
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "t",
        "-x",
        "100",
        "-y",
        "30",
        "sh",
        "-c",
        &script,
    ]);
    tmux
}

#[test]
fn an_interactive_shell_in_a_real_terminal_resizes_takes_ctrl_c_and_restores_the_terminal() {
    let _watchdog = Watchdog::arm(TEST_LIMIT);
    let d = start();
    let id = create(&d, "{}");
    let tmux = shell_in_tmux(&d, &id);
    // A prompt of our own, found nowhere else on the screen.
    tmux.keys(&["export PS1='cap''> '", "Enter"]);
    tmux.wait_for("cap>", 1);

    tmux.keys(&["stty size", "Enter"]);
    tmux.wait_for("30 100", 1);

    // The CLI gets SIGWINCH and passes the new size on.
    tmux.run(&["resize-window", "-t", "t", "-x", "120", "-y", "40"]);
    std::thread::sleep(Duration::from_millis(500));
    tmux.keys(&["clear; stty size", "Enter"]);
    tmux.wait_for("40 120", 1);

    // Ctrl-C is a keystroke to the sandbox's terminal: it stops the job,
    // the shell lives on and says so.
    tmux.keys(&["clear; sleep 100", "Enter"]);
    std::thread::sleep(Duration::from_secs(1));
    let t = Instant::now();
    tmux.keys(&["C-c"]);
    tmux.keys(&["echo status=$?", "Enter"]);
    tmux.wait_for("status=130", 1);
    assert!(t.elapsed() < Duration::from_secs(30));

    // A full-screen program draws and quits.
    tmux.keys(&["clear; top", "Enter"]);
    tmux.wait_for("PID", 1);
    tmux.keys(&["q"]);
    tmux.keys(&["echo ba''ck", "Enter"]);
    tmux.wait_for("back", 1);

    tmux.keys(&["exit 3", "Enter"]);
    // The line after the session is whole once stty has answered.
    let screen = tmux.wait_for("|modes-end", 1);
    assert!(screen.contains("shell-exit=3"), "{screen}");
    // The local terminal is canonical and echoes again.
    let modes = screen
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("modes: "))
        .unwrap_or_default()
        .trim_end_matches("|modes-end")
        .to_string();
    assert_eq!(
        modes.split_whitespace().collect::<Vec<_>>(),
        ["icanon", "echo"],
        "{screen}"
    );

    // The session's shell is gone from the sandbox; the sandbox is not.
    let (status, _) = d.call("DELETE", &format!("/v1/sandboxes/{id}"), None);
    assert_eq!(status, 204);
}
