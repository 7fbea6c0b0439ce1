//! Criterion benchmarks of snapshots: creating one, restoring to the first
//! command with each memory backend, and forking N replicas.
//!
//! Needs hardware KVM and the guest artifacts; `make bench` provides both,
//! inside the nested test host where the machine's KVM is not
//! hardware-backed (compare figures there only as ratios).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use sandbox::{fork_identity, MemoryBackend, RestoreOptions, Sandbox};

mod common;

/// Runs `f`, ending the whole run if it takes longer than five minutes: a
/// guest that stops answering (the nested test host does that now and
/// then) must fail the benchmark, not hang it.
fn bounded<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let what = what.to_string();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
            wait.recv_timeout(Duration::from_secs(300))
        {
            eprintln!("benchmark: {what} took more than 5 minutes; a guest stopped answering");
            std::process::exit(3);
        }
    });
    let out = f();
    let _ = done.send(());
    out
}

fn boot() -> Sandbox {
    let mut vm = common::builder().boot().expect("boot");
    vm.wait_ready(Duration::from_secs(120)).expect("ready");
    vm
}

/// Where snapshots go: the temporary directory (tmpfs inside the nested
/// test host, where the shared scratch directory is 9p).
fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("capsule-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A snapshot of a ready guest that has run one command.
fn primed_snapshot(dir: &Path) {
    let mut vm = boot();
    vm.exec(["true"]).expect("exec");
    vm.snapshot(dir).expect("snapshot");
    vm.kill();
}

fn snapshot_create(c: &mut Criterion) {
    let dir = scratch().join("create");
    let mut vm = boot();
    vm.exec(["true"]).expect("exec");
    c.bench_function("snapshot_create_256m", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // Snapshots always go into a new directory.
                let _ = std::fs::remove_dir_all(&dir);
                let t = Instant::now();
                vm.snapshot(&dir).expect("snapshot");
                total += t.elapsed();
            }
            total
        })
    });
    vm.kill();
}

fn restore_to_first_exec(c: &mut Criterion) {
    let dir = scratch().join("restore");
    primed_snapshot(&dir);
    // The working set the prefetching backend replays.
    {
        let options = RestoreOptions {
            vm: vmm::RestoreOptions {
                memory: MemoryBackend::Uffd { prefetch: false },
                ..Default::default()
            },
            ..Default::default()
        };
        let mut vm = Sandbox::restore(&dir, options).expect("restore");
        vm.exec(["true"]).expect("exec");
        vm.vm().save_working_set(&dir).expect("working set");
        vm.kill();
    }
    let mut group = c.benchmark_group("restore_to_first_exec");
    for (name, memory) in [
        ("file", MemoryBackend::File),
        ("uffd", MemoryBackend::Uffd { prefetch: false }),
        ("uffd_prefetch", MemoryBackend::Uffd { prefetch: true }),
    ] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let options = RestoreOptions {
                        vm: vmm::RestoreOptions {
                            memory,
                            ..Default::default()
                        },
                        ..Default::default()
                    };
                    let t = Instant::now();
                    let (mut vm, out) = bounded("a restore", || {
                        let mut vm = Sandbox::restore(&dir, options).expect("restore");
                        let out = vm.exec(["true"]).expect("exec");
                        (vm, out)
                    });
                    total += t.elapsed();
                    assert!(out.status.success());
                    vm.kill();
                }
                total
            })
        });
    }
    group.finish();
}

/// Restores `n` forks of the snapshot in `dir` at once and runs `true` in
/// each; the first failure, with every fork stopped.
fn fork_all(dir: &Path, n: usize) -> sandbox::Result<Vec<Sandbox>> {
    let results: Vec<sandbox::Result<Sandbox>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                scope.spawn(move || {
                    let options = RestoreOptions {
                        identity: fork_identity(format!("fork-{i}"))?,
                        ..Default::default()
                    };
                    let mut vm = Sandbox::restore(dir, options)?;
                    let started = Instant::now();
                    match vm.exec(["true"]) {
                        Ok(_) => Ok(vm),
                        // Said as a restore says it, with the console,
                        // which tells a stalled guest from a crashed one.
                        Err(e) if e.is_guest_unresponsive() => Err(sandbox::Error::NotReady {
                            seconds: started.elapsed().as_secs_f64(),
                            console: format!("({e})\n{}", vm.console_tail(20)),
                        }),
                        Err(e) => Err(e),
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut forks = Vec::with_capacity(n);
    let mut failure = None;
    for result in results {
        match result {
            Ok(vm) => forks.push(vm),
            Err(e) => failure = failure.or(Some(e)),
        }
    }
    match failure {
        None => Ok(forks),
        Some(e) => {
            for mut vm in forks {
                vm.kill();
            }
            Err(e)
        }
    }
}

/// Inside the nested test host a guest now and then dies or stalls on its
/// own (docs/TESTING.md); a fork-N iteration where one did is discarded
/// and run again, and said so. Anywhere else, and for any other failure,
/// the benchmark fails.
fn nested_host_failure(e: &sandbox::Error) -> bool {
    // A guest that said something (a panic, an oops, the agent) failed
    // for a reason of its own.
    let silent = |console: &str| !vmm::console_shows_guest_failure(console);
    std::env::var_os("CAPSULE_IN_TESTHOST").is_some()
        && match e {
            sandbox::Error::NotReady { console, .. } => silent(console),
            sandbox::Error::StoppedBeforeReady { exit, console } => {
                *exit == vmm::VmExit::GuestReset.to_string() && silent(console)
            }
            _ => false,
        }
}

fn fork_n(c: &mut Criterion) {
    let _ = vmm::host::raise_fd_limit();
    let dir = scratch().join("fork");
    primed_snapshot(&dir);
    let mut group = c.benchmark_group("fork_to_first_exec");
    for n in [1usize, 10, 50] {
        if n == 50 && std::env::var_os("CAPSULE_IN_TESTHOST").is_some() {
            // Its kernel panicked every time under 50 guests (TESTING.md);
            // scripts/compare-qemu-snapshot.py measures fork 50 there.
            eprintln!("fork_to_first_exec/50: not run inside the nested test host");
            continue;
        }
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut discarded = 0;
                for _ in 0..iters {
                    loop {
                        let t = Instant::now();
                        match bounded("a fork", || fork_all(&dir, n)) {
                            Ok(forks) => {
                                total += t.elapsed();
                                for mut vm in forks {
                                    vm.kill();
                                }
                                break;
                            }
                            Err(e) if nested_host_failure(&e) && discarded < 5 => {
                                discarded += 1;
                                eprintln!(
                                    "\nfork_to_first_exec/{n}: discarded an iteration, a guest \
                                     died or stalled in the nested test host: {e}"
                                );
                            }
                            Err(e) => panic!("fork_to_first_exec/{n}: {e}"),
                        }
                    }
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(10));
    targets = snapshot_create, restore_to_first_exec, fork_n
}
criterion_main!(benches);
