#!/usr/bin/env bash
# The whole test suite: lints, unit tests, PID-namespace integration tests, QEMU boot tests.
# Run as root on Debian; installs what it needs. Usage: tests/run-all.sh [--no-qemu]
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export TAU_LOG_TAG=tests
# shellcheck source=qemu/common.sh
. qemu/common.sh

QEMU=1
for a in "$@"; do
    case "$a" in
        --no-qemu) QEMU=0 ;;
        *) tau_die "unknown argument $a (usage: tests/run-all.sh [--no-qemu])" ;;
    esac
done

[ "$(id -u)" = 0 ] || tau_die "run as root: the integration tests create PID namespaces and boot QEMU"
command -v cargo >/dev/null || tau_die "cargo not found: install the Rust toolchain first"
tau_ensure_pkgs util-linux qemu-system-x86 cpio e2fsprogs xz-utils file kmod

step() { printf '\n==== %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

if [ "$QEMU" = 1 ]; then
    step "QEMU: kernel and image"
    tau_kernel
    initramfs/build.sh --units qemu/check-units --units tests/qemu-units
    export TAU_QEMU=1
fi

step "cargo test --workspace"
out="$TAU_TARGET_DIR/test-output.log"
mkdir -p "$TAU_TARGET_DIR"
cargo test --workspace --all-targets -- --test-threads=2 2>&1 | tee "$out"
# One closing line for the whole suite (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6; s += $8 } END { printf "\ntests: %d passed, %d failed, %d skipped\n", p, f, s }' "$out"
