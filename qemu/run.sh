#!/usr/bin/env bash
# Build the TauOS initramfs and boot it in QEMU (serial console on stdout).
#
# Usage: qemu/run.sh [options] [-- EXTRA-QEMU-ARGS...]
#   --append "ARGS"  extra kernel command line (after console=ttyS0 panic=-1 loglevel=4)
#   --disk FILE      attach FILE as a raw virtio disk (/dev/vda); created (64 MiB sparse,
#                    mkfs.ext4) if it does not exist
#   --units DIR      add DIR/*.toml units, DIR/bin/* and DIR/etc/* (see initramfs/build.sh;
#                    repeatable). Without --check, qemu/dev-units (a root shell on the console)
#                    is added too.
#   --image FILE     initramfs to build/boot (default: target/tauos-initramfs.cpio.gz)
#   --init FILE      build with FILE as /init instead of tau-init (placeholder boots)
#   --no-build       boot the existing image as is
#   --timeout SECS   kill QEMU after SECS (exit 124); default: none (120 with --check)
#   --log FILE       also write the console to FILE (default: target/qemu-last.log)
#   --check          smoke test: add the qemu/check-units unit (run with tau_check.run=1) that
#                    waits until every critical unit is running, prints `taucli status`
#                    and TAU-CHECK: OK|FAIL, then runs `taucli poweroff`. Exit 0 only if
#                    TAU-CHECK: OK was printed and the guest powered itself off in time.
#                    With --no-build the image must have been built with --check (or with
#                    --units qemu/check-units); the unit is idle without tau_check.run=1.
#   --kvm            use KVM (default: TCG; KVM is not reliable everywhere)
#   --memory MB      guest memory (default 512)
#   -q, --quiet      do not echo the console (still logged)
#
# Exit status without --check: QEMU's (0 after a guest power-off or reboot), 124 on
# timeout, 3 if the kernel panicked. On failure the command to reproduce is printed.
set -euo pipefail

export TAU_LOG_TAG=qemu
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ORIG_ARGS=("$@")
APPEND=""
DISK=""
UNITS=()
IMAGE="$TAU_TARGET_DIR/tauos-initramfs.cpio.gz"
INIT=""
BUILD=1
TIMEOUT=""
LOG="$TAU_TARGET_DIR/qemu-last.log"
CHECK=0
ACCEL=tcg
MEMORY=512
QUIET=0
QEMU_EXTRA=()

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
need() { [ "$2" -ge 2 ] || tau_die "$1 needs a value (see --help)"; }
abspath() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }

while [ $# -gt 0 ]; do
    case "$1" in
        --append) need "$1" $#; APPEND="${APPEND:+$APPEND }$2"; shift 2 ;;
        --disk) need "$1" $#; DISK="$(abspath "$2")"; shift 2 ;;
        --units) need "$1" $#; UNITS+=(--units "$(abspath "$2")"); shift 2 ;;
        --image) need "$1" $#; IMAGE="$(abspath "$2")"; shift 2 ;;
        --init) need "$1" $#; INIT="$(abspath "$2")"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --timeout) need "$1" $#; TIMEOUT="$2"; shift 2 ;;
        --log) need "$1" $#; LOG="$(abspath "$2")"; shift 2 ;;
        --check) CHECK=1; shift ;;
        --kvm) ACCEL=kvm; shift ;;
        --memory) need "$1" $#; MEMORY="$2"; shift 2 ;;
        -q|--quiet) QUIET=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; QEMU_EXTRA=("$@"); break ;;
        *) tau_die "unknown option $1 (see --help)" ;;
    esac
done
if [ -n "$TIMEOUT" ]; then
    [[ "$TIMEOUT" =~ ^[0-9]+$ ]] || tau_die "--timeout wants whole seconds"
elif [ "$CHECK" = 1 ]; then
    TIMEOUT=120
fi

repro() {
    local q
    printf -v q ' %q' "${ORIG_ARGS[@]}"
    tau_log "reproduce with: (cd $(printf '%q' "$PWD") && $(printf '%q' "${BASH_SOURCE[0]}")${ORIG_ARGS[*]:+$q})"
    tau_log "console log: $LOG"
}

tau_ensure_pkgs qemu-system-x86 cpio e2fsprogs file xz-utils
tau_kernel

if [ "$CHECK" = 1 ]; then
    UNITS=(--units "$TAU_REPO_ROOT/qemu/check-units" "${UNITS[@]}")
    APPEND="${APPEND:+$APPEND }tau_check.run=1"
else
    # Interactive boot: a root shell on the console (qemu/dev-units).
    UNITS=(--units "$TAU_REPO_ROOT/qemu/dev-units" "${UNITS[@]}")
fi
if [ "$BUILD" = 1 ]; then
    build=("$TAU_REPO_ROOT/initramfs/build.sh" --out "$IMAGE" "${UNITS[@]}")
    [ -z "$INIT" ] || build+=(--init "$INIT")
    "${build[@]}" || { repro; exit 1; }
elif [ "${#UNITS[@]}" -gt 0 ] && [ "$CHECK" = 0 ]; then
    tau_log "note: --units ignored with --no-build (the image was built before)"
fi
[ -f "$IMAGE" ] || tau_die "no image $IMAGE (drop --no-build)"

if [ -n "$DISK" ] && [ ! -e "$DISK" ]; then
    tau_log "creating disk $DISK (64 MiB ext4)"
    mkdir -p "$(dirname "$DISK")"
    truncate -s 64M "$DISK"
    mkfs.ext4 -q -F "$DISK"
fi

qemu=(qemu-system-x86_64 -m "$MEMORY" -smp 2 -nographic -no-reboot -nic none
      -kernel "$TAU_VMLINUZ" -initrd "$IMAGE"
      -append "console=ttyS0 panic=-1 loglevel=4${APPEND:+ $APPEND}")
if [ "$ACCEL" = kvm ]; then
    [ -w /dev/kvm ] || tau_die "--kvm: /dev/kvm is not usable"
    qemu+=(-accel kvm -cpu host)
else
    qemu+=(-accel tcg)
fi
[ -z "$DISK" ] || qemu+=(-drive "file=$DISK,format=raw,if=virtio")
qemu+=("${QEMU_EXTRA[@]}")

mkdir -p "$(dirname "$LOG")"
: > "$LOG"
printf -v qemu_cmd ' %q' "${qemu[@]}"
tau_log "booting:$qemu_cmd"
start=$SECONDS
set +e
if [ -n "$TIMEOUT" ]; then
    # timeout runs QEMU as its child and kills only it (TERM, then KILL 5 s later).
    timeout -k 5 "$TIMEOUT" "${qemu[@]}" < /dev/null 2>&1 | if [ "$QUIET" = 1 ]; then cat >> "$LOG"; else tee -a "$LOG"; fi
else
    "${qemu[@]}" 2>&1 | if [ "$QUIET" = 1 ]; then cat >> "$LOG"; else tee -a "$LOG"; fi
fi
status=${PIPESTATUS[0]}
set -e
elapsed=$((SECONDS - start))

if [ -n "$TIMEOUT" ] && { [ "$status" = 124 ] || [ "$status" = 137 ]; }; then
    tau_log "FAIL: timeout: QEMU killed after ${TIMEOUT}s"
    if [ "$CHECK" = 1 ]; then
        tau_log "check said: $(grep -a -o 'TAU-CHECK: .*' "$LOG" | tr -d '\r' | head -n1 || true)"
    fi
    repro
    exit 124
fi
panicked=0
if grep -q 'Kernel panic' "$LOG"; then panicked=1; fi
if [ "$CHECK" = 1 ]; then
    reason=""
    if ! grep -q 'TAU-CHECK: OK' "$LOG"; then
        reason="$(grep -a -o 'TAU-CHECK: FAIL.*' "$LOG" | tr -d '\r' | head -n1)"
        reason="${reason:-no TAU-CHECK marker}"
    elif [ "$panicked" = 1 ]; then
        reason="kernel panic (init died?) instead of a clean power-off"
    elif ! grep -q 'reboot: Power down' "$LOG"; then
        reason="guest did not power off (QEMU exit $status)"
    elif [ "$status" != 0 ]; then
        reason="QEMU exited with $status"
    fi
    if [ -n "$reason" ]; then
        tau_log "FAIL: $reason (${elapsed}s)"
        repro
        exit 1
    fi
    tau_log "PASS: TAU-CHECK: OK and guest powered off (${elapsed}s)"
    exit 0
fi
if [ "$panicked" = 1 ]; then
    tau_log "FAIL: kernel panic (${elapsed}s)"
    repro
    exit 3
fi
if [ "$status" != 0 ]; then
    tau_log "FAIL: QEMU exited with $status (${elapsed}s)"
    repro
fi
tau_log "QEMU exited with $status after ${elapsed}s"
exit "$status"
