# Capsule: `make demo` and `make test` do all their own set-up.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := build

TARGET    := x86_64-unknown-linux-gnu
ARTIFACTS := target/capsule
AGENT     := target/$(TARGET)/agent/capsule-agent

export CAPSULE_KERNEL    := $(abspath $(ARTIFACTS)/vmlinux)
export CAPSULE_INITRAMFS := $(abspath $(ARTIFACTS)/initramfs.cpio)
export CAPSULE_ROOTFS    := $(abspath $(ARTIFACTS)/rootfs.ext4)
export CAPSULE_BZIMAGE   := $(abspath $(ARTIFACTS)/bzImage)

.PHONY: deps kernel agent artifacts build demo test test-host test-guest test-sdk lint bench fuzz fmt clean

deps:
	@images/install-deps.sh

# The guest kernel is cached per machine; this only copies it into place.
kernel: deps
	@mkdir -p $(ARTIFACTS)
	@vmlinux=$$(images/build-kernel.sh) && cp -u "$$vmlinux" $(ARTIFACTS)/vmlinux && \
	  cp -u "$$(dirname $$vmlinux)/bzImage" $(ARTIFACTS)/bzImage

# The agent is PID 1 in the guest: a static binary (no musl target here).
agent:
	RUSTFLAGS="-C target-feature=+crt-static" cargo build --profile agent \
	  -p guest-agent --bin capsule-agent --target $(TARGET)

artifacts: kernel agent
	images/build-initramfs.sh $(AGENT) $(ARTIFACTS)/initramfs.cpio
	@[ -f $(ARTIFACTS)/rootfs.ext4 ] && [ $(ARTIFACTS)/rootfs.ext4 -nt images/populate-root.sh ] || \
	  images/build-rootfs.sh $(ARTIFACTS)/rootfs.ext4

build: deps
	cargo build --release --bins --examples -p capsule -p capsule-vmm

demo: artifacts build
	@scripts/demo.sh

test: artifacts test-host test-guest test-sdk

# Host tier: everything that needs no Linux guest.
test-host: deps
	cargo nextest run --workspace --no-fail-fast -E 'not binary(guest)'
	scripts/schemathesis.sh

# Guest tier: real Linux guests, directly on hardware KVM or inside the
# nested test host. Never skipped: it fails if it cannot run.
test-guest: artifacts
	@scripts/test-guest.sh

# The Python SDK and `capsule mcp`, pip-installed from the checkout and
# tested with pytest and the `mcp` package's clients (stdio and streamable
# HTTP) against a real daemon and real guests.
test-sdk: artifacts
	@scripts/test-sdk.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

bench: artifacts build
	scripts/bench.sh
	scripts/compare-qemu.sh
	scripts/compare-qemu.sh --snapshot
	scripts/compare-qemu.sh --block
	scripts/compare-qemu.sh --debian
	scripts/bench-daemon.sh

# cargo-fuzz targets (fuzz/): what Capsule reads from guests, agents and
# snapshot files. Each runs FUZZ_SECONDS; findings land in fuzz/artifacts/.
FUZZ_SECONDS ?= 300
FUZZ_TARGETS := agent_frames agent_session snapshot_state layer_header virtio_blk virtio_vsock
fuzz:
	@rustup toolchain list | grep -q '^nightly' || { echo "fuzz: needs the nightly toolchain (rustup toolchain install nightly)" >&2; exit 1; }
	@command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
	cd fuzz && for t in $(FUZZ_TARGETS); do \
	  echo "fuzz: $$t for $(FUZZ_SECONDS) s"; \
	  cargo +nightly fuzz run $$t -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=4096 -print_final_stats=1 || exit 1; \
	done

fmt:
	cargo fmt --all

clean:
	cargo clean
