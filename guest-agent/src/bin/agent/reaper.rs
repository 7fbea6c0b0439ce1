//! PID 1 must reap every process that dies, including orphans it never
//! started. One thread waits for any child; exits of processes the agent
//! started are routed to whoever is waiting on them, the rest are dropped.

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Condvar, Mutex, OnceLock};

use crate::sys::{self, WaitStatus};

#[derive(Default)]
struct State {
    waiters: HashMap<i32, Sender<WaitStatus>>,
    /// Bumped on every spawn so the reaper knows to wait again after it
    /// ran out of children.
    generation: u64,
}

pub struct Reaper {
    state: Mutex<State>,
    spawned: Condvar,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Reaper {
    pub fn global() -> &'static Reaper {
        static REAPER: OnceLock<Reaper> = OnceLock::new();
        REAPER.get_or_init(|| {
            std::thread::Builder::new()
                .name("reaper".into())
                .spawn(|| Reaper::global().run())
                .expect("cannot start the reaper thread");
            Reaper {
                state: Mutex::default(),
                spawned: Condvar::new(),
            }
        })
    }

    /// Runs `spawn` with the reaper locked, so the child cannot be reaped
    /// before its waiter is registered, and returns a receiver for its exit.
    pub fn spawn<T, E>(
        &self,
        spawn: impl FnOnce() -> Result<(i32, T), E>,
    ) -> Result<(T, Receiver<WaitStatus>), E> {
        let mut state = lock(&self.state);
        let (pid, value) = spawn()?;
        let (tx, rx) = mpsc::channel();
        state.waiters.insert(pid, tx);
        state.generation += 1;
        self.spawned.notify_all();
        Ok((value, rx))
    }

    fn run(&self) {
        let mut seen = 0;
        loop {
            match sys::wait_any() {
                Ok(Some((pid, status))) => {
                    if let Some(tx) = lock(&self.state).waiters.remove(&pid) {
                        let _ = tx.send(status);
                    }
                }
                Ok(None) => {
                    let mut state = lock(&self.state);
                    while state.generation == seen {
                        state = self.spawned.wait(state).unwrap_or_else(|p| p.into_inner());
                    }
                    seen = state.generation;
                }
                Err(e) => {
                    eprintln!("capsule-agent: waitpid failed: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
        }
    }
}
