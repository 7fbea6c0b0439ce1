//! Criterion benchmarks of the two numbers users feel: boot to agent-ready
//! and the round trip of running `true` in a ready guest.
//!
//! Needs hardware KVM and the guest artifacts (`CAPSULE_KERNEL`,
//! `CAPSULE_INITRAMFS`); `make bench` provides both, inside the nested
//! test host where the machine's KVM is not hardware-backed.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
mod common;

use common::builder;

fn boot_to_ready(c: &mut Criterion) {
    c.bench_function("boot_to_ready", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut vm = builder().boot().expect("boot");
                total += vm.wait_ready(Duration::from_secs(120)).expect("ready");
                vm.kill();
            }
            total
        })
    });
}

fn exec_round_trip(c: &mut Criterion) {
    let mut vm = builder().boot().expect("boot");
    vm.wait_ready(Duration::from_secs(120)).expect("ready");
    c.bench_function("exec_true_round_trip", |b| {
        b.iter(|| {
            let out = vm.exec(["true"]);
            let out = out.unwrap_or_else(|e| {
                panic!(
                    "exec: {e}; the VM: {:?}; its console:\n{}",
                    vm.exit_reason(),
                    vm.console_tail(30)
                )
            });
            assert!(out.status.success());
        })
    });
    vm.kill();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(20));
    targets = boot_to_ready, exec_round_trip
}
criterion_main!(benches);
