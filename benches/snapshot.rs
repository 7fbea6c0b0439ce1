//! Criterion benchmarks of snapshots: creating one, restoring to the first
//! command with each memory backend, and forking N replicas.
//!
//! Needs hardware KVM and the guest artifacts; `make bench` provides both,
//! inside the nested test host where the machine's KVM is not
//! hardware-backed (compare figures there only as ratios).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use vmm::{fork_identity, MemoryBackend, RestoreOptions, Vm};

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

fn boot() -> Vm {
    let mut vm = common::builder().boot().expect("boot");
    vm.wait_ready(Duration::from_secs(120)).expect("ready");
    vm
}

fn scratch() -> PathBuf {
    let base = std::env::var_os("CAPSULE_SCRATCH")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("capsule-bench-{}", std::process::id()));
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
            memory: MemoryBackend::Uffd { prefetch: false },
            ..Default::default()
        };
        let mut vm = Vm::restore(&dir, options).expect("restore");
        vm.exec(["true"]).expect("exec");
        vm.save_working_set(&dir).expect("working set");
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
                        memory,
                        ..Default::default()
                    };
                    let t = Instant::now();
                    let (mut vm, out) = bounded("a restore", || {
                        let mut vm = Vm::restore(&dir, options).expect("restore");
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

fn fork_n(c: &mut Criterion) {
    let _ = vmm::host::raise_fd_limit();
    let dir = scratch().join("fork");
    primed_snapshot(&dir);
    let mut group = c.benchmark_group("fork_to_first_exec");
    for n in [1usize, 10, 50] {
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    let forks: Vec<Vm> = bounded("a fork", || {
                        std::thread::scope(|scope| {
                            let handles: Vec<_> = (0..n)
                                .map(|i| {
                                    let dir = &dir;
                                    scope.spawn(move || {
                                        let options = RestoreOptions {
                                            memory: MemoryBackend::File,
                                            identity: fork_identity(format!("fork-{i}")).unwrap(),
                                            ..Default::default()
                                        };
                                        let mut vm = Vm::restore(dir, options).expect("restore");
                                        vm.exec(["true"]).expect("exec");
                                        vm
                                    })
                                })
                                .collect();
                            handles.into_iter().map(|h| h.join().unwrap()).collect()
                        })
                    });
                    total += t.elapsed();
                    for mut vm in forks {
                        vm.kill();
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
