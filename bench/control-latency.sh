#!/usr/bin/env bash
# control-latency.sh: round-trip latency of `taucli status <unit>` (process start
# included), compared in the same run with the equivalent status query of peer
# supervisors: runit's `sv status <dir>` (runsv) and s6's `s6-svstat <dir>`
# (s6-supervise), plus `s6-svok <dir>`, `/bin/true` (cost of fork+exec of a tiny
# C program) and `taucli --version` (cost of exec'ing the taucli binary itself,
# no IPC).
#
# Usage: bench/control-latency.sh [--runs N] [--units-count K] [--json-out FILE]
#                                 [--tmpdir DIR] [--no-build]
#   --runs N         timed round trips per tool (default 300)
#   --units-count K  units loaded in tau-init (default 1); `taucli --json status`
#                    (all units) shows how the reply size scales
#   --tmpdir DIR     where the run/service dirs go (default /dev/shm when it is a
#                    tmpfs, like /run in production; else $TMPDIR or /tmp)
#   --no-build       use the binaries already in target/release
#
# Needs root (apt-get install of runit/s6 when missing). Installs with
# --no-install-recommends: Debian's runit recommends runit-init/runit-run, which
# would replace or hook into the machine's init; only the tools are wanted.
set -euo pipefail
export LC_ALL=C

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
REPO_DIR=$(cd -- "$SCRIPT_DIR/.." && pwd -P)
RESULTS_DIR="$SCRIPT_DIR/results"

RUNS=300
UNITS_COUNT=1
JSON_OUT="$RESULTS_DIR/control-latency.json"
TMP_BASE=""
BUILD=1

usage() {
    sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

die() {
    echo "control-latency: $*" >&2
    exit 1
}

while (($#)); do
    case "$1" in
        --runs)
            (($# >= 2)) || die "--runs needs a value"
            RUNS=$2
            shift 2
            ;;
        --units-count)
            (($# >= 2)) || die "--units-count needs a value"
            UNITS_COUNT=$2
            shift 2
            ;;
        --json-out)
            (($# >= 2)) || die "--json-out needs a value"
            JSON_OUT=$2
            shift 2
            ;;
        --tmpdir)
            (($# >= 2)) || die "--tmpdir needs a value"
            TMP_BASE=$2
            shift 2
            ;;
        --no-build)
            BUILD=0
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            usage >&2
            exit 2
            ;;
    esac
done
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "--runs must be a positive integer"
[[ $UNITS_COUNT =~ ^[1-9][0-9]*$ ]] || die "--units-count must be a positive integer"
# EPOCHREALTIME (bash >= 5) gives microseconds without forking `date` inside the
# timed window.
[[ -n ${EPOCHREALTIME:-} ]] || die "bash >= 5 is needed (EPOCHREALTIME)"

SCRIPT_START=$EPOCHREALTIME

# ---------------------------------------------------------------- packages --
is_installed() {
    [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true) == "install ok installed" ]]
}

missing=()
for pkg in runit s6; do
    is_installed "$pkg" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    ((EUID == 0)) || die "need root to install: ${missing[*]}"
    echo "installing: ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
for tool in runsv sv s6-supervise s6-svstat s6-svok s6-svc; do
    command -v "$tool" >/dev/null || die "$tool not found after install"
done

# ------------------------------------------------------------------- build --
CARGO=$(command -v cargo || true)
[[ -n $CARGO ]] || CARGO="$HOME/.cargo/bin/cargo"
[[ -x $CARGO ]] || die "cargo not found"
# The binaries as TauOS ships them (initramfs/build.sh): static, so no dynamic loader cost.
TRIPLE=x86_64-unknown-linux-gnu
if ((BUILD)); then
    echo "building tau-init (release, static)..." >&2
    (cd "$REPO_DIR" && RUSTFLAGS="-C target-feature=+crt-static" \
        "$CARGO" build --release --quiet --target "$TRIPLE" --bin tau-init --bin taucli)
fi
BUILD_DONE=$EPOCHREALTIME
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO_DIR/target}
[[ $TARGET_DIR == /* ]] || TARGET_DIR="$REPO_DIR/$TARGET_DIR"
TAU_INIT="$TARGET_DIR/$TRIPLE/release/tau-init"
TAUCLI="$TARGET_DIR/$TRIPLE/release/taucli"
[[ -x $TAU_INIT && -x $TAUCLI ]] || die "built binaries not found in $TARGET_DIR/$TRIPLE/release"

# ----------------------------------------------------------------- cleanup --
# The run dirs of all three supervisors live on a tmpfs in production (/run):
# taucli creates and removes a reply FIFO per call, which costs more on a disk
# file system, so default to a tmpfs.
if [[ -z $TMP_BASE ]]; then
    TMP_BASE=${TMPDIR:-/tmp}
    if [[ $(stat -f -c %T /dev/shm 2>/dev/null || true) == tmpfs && -w /dev/shm ]]; then
        TMP_BASE=/dev/shm
    fi
fi
[[ -d $TMP_BASE ]] || die "--tmpdir $TMP_BASE: no such directory"
TMP=$(mktemp -d "$TMP_BASE/tau-control-bench.XXXXXX")
TMP_FS=$(stat -f -c %T "$TMP")
TAU_PID=""
RUNSV_PID=""
S6_PID=""

# Wait up to $2 tenths of a second for pid $1 to exit; 0 if it did.
wait_gone() {
    local pid=$1 tenths=$2 i
    for ((i = 0; i < tenths; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    ! kill -0 "$pid" 2>/dev/null
}

# Direct children of pid $1 (by pid, from /proc).
children_of() {
    cat /proc/"$1"/task/*/children 2>/dev/null || true
}

# SIGKILL pid $1 and its direct children (the supervised sleep), by pid.
kill_tree() {
    local pid=$1 kids
    kids=$(children_of "$pid")
    kill -KILL "$pid" 2>/dev/null || true
    # shellcheck disable=SC2086 # word splitting of the pid list is intended
    [[ -z $kids ]] || kill -KILL $kids 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if [[ -n $TAU_PID ]] && kill -0 "$TAU_PID" 2>/dev/null; then
        kill -TERM "$TAU_PID"
        if ! wait_gone "$TAU_PID" 100; then
            echo "tau-init ($TAU_PID) ignored SIGTERM for 10 s; killing it" >&2
            kill_tree "$TAU_PID"
        fi
        wait "$TAU_PID" 2>/dev/null
    fi
    if [[ -n $RUNSV_PID ]] && kill -0 "$RUNSV_PID" 2>/dev/null; then
        sv exit "$TMP/runit/svc" >/dev/null 2>&1 || kill -TERM "$RUNSV_PID"
        wait_gone "$RUNSV_PID" 50 || kill_tree "$RUNSV_PID"
        wait "$RUNSV_PID" 2>/dev/null
    fi
    if [[ -n $S6_PID ]] && kill -0 "$S6_PID" 2>/dev/null; then
        s6-svc -dx "$TMP/s6/svc" >/dev/null 2>&1 || kill -TERM "$S6_PID"
        wait_gone "$S6_PID" 50 || kill_tree "$S6_PID"
        wait "$S6_PID" 2>/dev/null
    fi
    if ((rc != 0)) && [[ -s $TMP/tau-init.log ]]; then
        echo "--- last lines of tau-init's log ---" >&2
        tail -n 20 "$TMP/tau-init.log" >&2
    fi
    rm -rf -- "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Poll `$@` (output into $TMP/probe) until it succeeds and its output matches
# regex $PATTERN, for up to 10 s.
wait_for() {
    local what=$1 pattern=$2 i
    shift 2
    for ((i = 0; i < 100; i++)); do
        if "$@" >"$TMP/probe" 2>&1 && [[ $(<"$TMP/probe") =~ $pattern ]]; then
            return 0
        fi
        sleep 0.1
    done
    echo "last output of $*:" >&2
    cat "$TMP/probe" >&2
    die "$what did not come up within 10 s"
}

# Service run scripts are exec'd from $TMP: catch a noexec mount early.
printf '#!/bin/sh\nexit 0\n' >"$TMP/exec-probe"
chmod +x "$TMP/exec-probe"
"$TMP/exec-probe" 2>/dev/null || die "cannot exec files in $TMP_BASE (noexec?); use --tmpdir"

# ---------------------------------------------------------------- tau-init --
mkdir -p "$TMP/units" "$TMP/run" "$TMP/state"
cat >"$TMP/tau.toml" <<EOF
[system]
run_dir = "$TMP/run"
state_dir = "$TMP/state"
audit_log = "$TMP/audit.log"
persistent_device = ""
cgroup_root = "$TMP/nocgroup"
hostname = ""
[crash_recovery]
session_state_path = "$TMP/session"
EOF
unit_names=(svc)
for ((i = 2; i <= UNITS_COUNT; i++)); do
    unit_names+=("svc-$i")
done
for u in "${unit_names[@]}"; do
    printf 'exec = ["/bin/sleep", "100000"]\n' >"$TMP/units/$u.toml"
done
"$TAU_INIT" --foreground --config "$TMP/tau.toml" --units "$TMP/units" --run-dir "$TMP/run" \
    </dev/null >"$TMP/tau-init.log" 2>&1 &
TAU_PID=$!
# Up and every unit running: `taucli --json status` lists them all.
tau_all_running() {
    local out
    out=$("$TAUCLI" --run-dir "$TMP/run" --json status) || return 1
    echo "$out"
    [[ $(grep -o '"running"' <<<"$out" | wc -l) -ge $UNITS_COUNT ]]
}
wait_for "tau-init" 'running' tau_all_running
wait_for "tau-init unit svc" 'running' "$TAUCLI" --run-dir "$TMP/run" status svc

# ------------------------------------------------------------------- runsv --
mkdir -p "$TMP/runit/svc"
printf '#!/bin/sh\nexec sleep 100000\n' >"$TMP/runit/svc/run"
chmod +x "$TMP/runit/svc/run"
runsv "$TMP/runit/svc" </dev/null >"$TMP/runsv.log" 2>&1 &
RUNSV_PID=$!
wait_for "runsv" '^run:' sv status "$TMP/runit/svc"

# ------------------------------------------------------------ s6-supervise --
mkdir -p "$TMP/s6/svc"
printf '#!/bin/sh\nexec sleep 100000\n' >"$TMP/s6/svc/run"
chmod +x "$TMP/s6/svc/run"
s6-supervise "$TMP/s6/svc" </dev/null >"$TMP/s6.log" 2>&1 &
S6_PID=$!
wait_for "s6-supervise" '^up ' s6-svstat "$TMP/s6/svc"

# ----------------------------------------------------------------- measure --
# Each entry: label, then the command (words separated by \x1f).
TOOLS=(
    "taucli status"
    "taucli --json status (all)"
    "sv status"
    "s6-svstat"
    "s6-svok"
    "/bin/true"
    "taucli --version"
)
CMDS=(
    "$TAUCLI"$'\x1f'--run-dir$'\x1f'"$TMP/run"$'\x1f'status$'\x1f'svc
    "$TAUCLI"$'\x1f'--run-dir$'\x1f'"$TMP/run"$'\x1f'--json$'\x1f'status
    sv$'\x1f'status$'\x1f'"$TMP/runit/svc"
    s6-svstat$'\x1f'"$TMP/s6/svc"
    s6-svok$'\x1f'"$TMP/s6/svc"
    /bin/true
    "$TAUCLI"$'\x1f'--version
)
ntools=${#TOOLS[@]}
# Resolve the command names once so that PATH lookup is not timed.
for ((t = 0; t < ntools; t++)); do
    IFS=$'\x1f' read -r -a words <<<"${CMDS[t]}"
    words[0]=$(command -v "${words[0]}")
    CMDS[t]=$(
        IFS=$'\x1f'
        echo "${words[*]}"
    )
    : >"$TMP/samples.$t"
done

# One timed round trip of tool $1; appends microseconds to its sample file.
measure() {
    local t=$1 t0 t1 words
    IFS=$'\x1f' read -r -a words <<<"${CMDS[t]}"
    t0=$EPOCHREALTIME
    "${words[@]}" >/dev/null || die "'${TOOLS[t]}' failed (exit $?)"
    t1=$EPOCHREALTIME
    echo $((10#${t1/./} - 10#${t0/./})) >>"$TMP/samples.$t"
}

echo "warming up..." >&2
for ((i = 0; i < 10; i++)); do
    for ((t = 0; t < ntools; t++)); do
        IFS=$'\x1f' read -r -a words <<<"${CMDS[t]}"
        "${words[@]}" >/dev/null
    done
done

MEASURE_START=$EPOCHREALTIME
echo "measuring $RUNS round trips per tool (round-robin, rotating start)..." >&2
for ((i = 0; i < RUNS; i++)); do
    # Rotate which tool goes first so no tool always follows the same one.
    for ((k = 0; k < ntools; k++)); do
        measure $(((i + k) % ntools))
    done
done

MEASURE_DONE=$EPOCHREALTIME

# ------------------------------------------------------------------- stats --
# Prints: mean p50 p90 p99 min max (µs; percentiles by nearest rank).
stats() {
    sort -n "$1" | awk '
        { v[NR] = $1; s += $1 }
        function pct(p,  r) { r = int((p * NR + 99) / 100); if (r < 1) r = 1; return v[r] }
        END { printf "%.0f %d %d %d %d %d\n", s / NR, pct(50), pct(90), pct(99), v[1], v[NR] }'
}

declare -a MEAN P50 P90 P99 MIN MAX
for ((t = 0; t < ntools; t++)); do
    read -r "MEAN[t]" "P50[t]" "P90[t]" "P99[t]" "MIN[t]" "MAX[t]" < <(stats "$TMP/samples.$t")
done
# ratio a b: a/b with two decimals.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }

TAU=0 SV=2 S6=3 TRUE=5 VER=6
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
ELAPSED=$(secs "$SCRIPT_START" "$EPOCHREALTIME")
BUILD_SECS=$(secs "$SCRIPT_START" "$BUILD_DONE")
MEASURE_SECS=$(secs "$MEASURE_START" "$MEASURE_DONE")
DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
CPU=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
NPROC=$(nproc)
KERNEL=$(uname -r)
TAUCLI_SIZE=$(stat -c %s "$TAUCLI")
SV_VER=$(dpkg-query -W -f='${Version}' runit)
S6_VER=$(dpkg-query -W -f='${Version}' s6)
TAU_VER=$("$TAUCLI" --version | awk '{ print $2 }')

echo
echo "control round-trip latency, $RUNS runs each, $UNITS_COUNT tau unit(s) loaded ($DATE)"
echo "host: $NPROC cpu(s), $CPU, kernel $KERNEL; run dirs on $TMP_FS ($TMP_BASE)"
printf '%-28s %9s %9s %9s %9s %11s\n' "tool" "mean_us" "p50_us" "p90_us" "p99_us" "p50/taucli"
for ((t = 0; t < ntools; t++)); do
    printf '%-28s %9d %9d %9d %9d %11s\n' "${TOOLS[t]}" "${MEAN[t]}" "${P50[t]}" "${P90[t]}" "${P99[t]}" \
        "$(ratio "${P50[t]}" "${P50[TAU]}")"
done
echo
echo "taucli status / sv status:  p50 $(ratio "${P50[TAU]}" "${P50[SV]}")x  p99 $(ratio "${P99[TAU]}" "${P99[SV]}")x"
echo "taucli status / s6-svstat:  p50 $(ratio "${P50[TAU]}" "${P50[S6]}")x  p99 $(ratio "${P99[TAU]}" "${P99[S6]}")x"
echo "p50 above /bin/true:  taucli status $((P50[TAU] - P50[TRUE])) us," \
    "taucli --version $((P50[VER] - P50[TRUE])) us," \
    "sv status $((P50[SV] - P50[TRUE])) us, s6-svstat $((P50[S6] - P50[TRUE])) us"
echo "script runtime: ${ELAPSED} s (install+build ${BUILD_SECS} s, timed loop ${MEASURE_SECS} s)"

# -------------------------------------------------------------------- JSON --
json_str() {
    local s=$1
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    printf '"%s"' "$s"
}
mkdir -p "$(dirname -- "$JSON_OUT")"
{
    echo "{"
    echo "  \"date\": $(json_str "$DATE"),"
    echo "  \"runs\": $RUNS,"
    echo "  \"units_count\": $UNITS_COUNT,"
    echo "  \"host\": {\"nproc\": $NPROC, \"cpu\": $(json_str "$CPU"), \"kernel\": $(json_str "$KERNEL")},"
    echo "  \"versions\": {\"tau-init\": $(json_str "$TAU_VER"), \"runit\": $(json_str "$SV_VER"), \"s6\": $(json_str "$S6_VER")},"
    echo "  \"taucli_bytes\": $TAUCLI_SIZE,"
    echo "  \"run_dir_fs\": $(json_str "$TMP_FS"),"
    echo "  \"script_seconds\": $ELAPSED,"
    echo "  \"install_build_seconds\": $BUILD_SECS,"
    echo "  \"timed_loop_seconds\": $MEASURE_SECS,"
    echo "  \"unit\": \"microseconds\","
    echo "  \"results\": ["
    for ((t = 0; t < ntools; t++)); do
        sep=","
        ((t == ntools - 1)) && sep=""
        printf '    {"tool": %s, "mean": %d, "p50": %d, "p90": %d, "p99": %d, "min": %d, "max": %d, "p50_over_taucli": %s}%s\n' \
            "$(json_str "${TOOLS[t]}")" "${MEAN[t]}" "${P50[t]}" "${P90[t]}" "${P99[t]}" "${MIN[t]}" "${MAX[t]}" \
            "$(ratio "${P50[t]}" "${P50[TAU]}")" "$sep"
    done
    echo "  ],"
    echo "  \"ratios\": {"
    echo "    \"taucli_over_sv_p50\": $(ratio "${P50[TAU]}" "${P50[SV]}"),"
    echo "    \"taucli_over_sv_p99\": $(ratio "${P99[TAU]}" "${P99[SV]}"),"
    echo "    \"taucli_over_s6_svstat_p50\": $(ratio "${P50[TAU]}" "${P50[S6]}"),"
    echo "    \"taucli_over_s6_svstat_p99\": $(ratio "${P99[TAU]}" "${P99[S6]}")"
    echo "  }"
    echo "}"
} >"$JSON_OUT"
echo "wrote $JSON_OUT" >&2
