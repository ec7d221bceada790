//! The control FIFO and `taucli` against tau-init running as PID 1 of a fresh PID namespace
//! (`unshare --pid --fork --mount-proc`): every command in text and JSON, exit codes, caller
//! identity and the audit log, 1,000 hostile requests, 100 concurrent clients, clients that do
//! not read their replies, reload, and `reexec` with 50 running units and one in backoff.
//!
//! taucli runs on the host side against `--run-dir <tmp>/run` (the FIFO is a filesystem object,
//! so it works across the PID namespace). Unit pids reported by tau-init are pids inside the
//! namespace; they are mapped to host pids through `NSpid:` in `/proc/<pid>/status`.
//!
//! The namespace tests need root and a working `unshare`; without them each one prints
//! `SKIP <test>: <reason>` and passes. They run one at a time (a process-wide lock) so that
//! timings are not skewed by each other. Set `TAU_CTL_KEEP=1` to keep the temp dirs.
//! Fixtures: `tests/fixtures/control/`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::ops::{Deref, DerefMut};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

use common::{
    NsInit, Proc, TestDir, host_procs, lock, log_tail, ns_test_guard, parse_stat, pid_ns_link,
    unshare_tau_init, uptime, wait_until,
};

const CLI: &str = env!("CARGO_BIN_EXE_taucli");

/// `REPLY_TIMEOUT_MS` of `src/control/server.rs`.
const REPLY_TIMEOUT_MS: u64 = 1000;
/// `MAX_REQUEST` of `src/control/protocol.rs`.
const MAX_REQUEST: usize = 4096;

const STATES: &[&str] = &[
    "starting", "running", "stopping", "stopped", "backoff", "failed",
];

// ---------------------------------------------------------------------------------------------
// Temp dirs, config and units
// ---------------------------------------------------------------------------------------------

/// A fresh directory per test (see `common::TestDir`), kept when the test failed or
/// `TAU_CTL_KEEP` is set.
impl TestDir {
    fn new(name: &str) -> Self {
        let dir = TestDir::create("tau-ctl", name, "TAU_CTL_KEEP");
        // Reachable by the unprivileged caller of the permission test.
        fs::set_permissions(&dir.path, fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    fn run(&self) -> PathBuf {
        self.p("run")
    }

    fn reply_dir(&self) -> PathBuf {
        self.p("run/reply")
    }

    /// Writes `tau.toml` (off every host resource); `extra` goes into `[system]`.
    fn config(&self, extra: &str) {
        let d = self.path.display();
        let text = format!(
            r#"[system]
run_dir = "{d}/run-from-file"
state_dir = "{d}/state"
audit_log = "{d}/audit.log"
persistent_device = ""
cgroup_root = "{d}/nocgroup"
hostname = ""
shutdown_kill_timeout_ms = 1000
{extra}

[crash_recovery]
session_state_path = "{d}/session"
"#
        );
        fs::write(self.p("tau.toml"), text).unwrap();
    }

    fn unit(&self, name: &str, body: &str) {
        fs::write(self.p(&format!("units/{name}.toml")), body).unwrap();
    }

    fn audit(&self) -> Vec<Value> {
        fs::read_to_string(self.p("audit.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("audit line {l:?} is not JSON: {e}"))
            })
            .collect()
    }
}

const SLEEPER: &str = r#"exec = ["/bin/sleep", "1000"]"#;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/control")
        .join(rel)
}

// ---------------------------------------------------------------------------------------------
// Host-side view of processes, FIFOs, requests
// ---------------------------------------------------------------------------------------------

/// `starttime` (field 22 of `/proc/<pid>/stat`), in clock ticks since boot.
fn start_time(host_pid: i32) -> Option<u64> {
    parse_stat(host_pid)?.1.get(19)?.parse().ok()
}

fn alive(host_pid: i32) -> bool {
    match parse_stat(host_pid) {
        Some((_, rest)) => rest.first().map(String::as_str) != Some("Z"),
        None => false,
    }
}

fn mkfifo(p: &Path, mode: u32) {
    nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(mode))
        .unwrap_or_else(|e| panic!("mkfifo {}: {e}", p.display()));
}

fn open_read_nb(p: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(p)
        .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
}

/// Everything readable now from a non-blocking reader (without waiting).
fn drain_now(f: &mut File) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    out
}

/// A request line as taucli would write it.
fn request(reply: &Path, cmd: &str, args: &[&str], flags: Value) -> Vec<u8> {
    let body =
        json!({ "reply": reply.display().to_string(), "cmd": cmd, "args": args, "flags": flags });
    format!("TAU/1 {body}\n").into_bytes()
}

/// Tiny deterministic PRNG (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

// ---------------------------------------------------------------------------------------------
// taucli
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

impl Out {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }
}

fn run_cmd(mut c: Command) -> Out {
    let t = Instant::now();
    let o = c.stdin(Stdio::null()).output().expect("run taucli");
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        elapsed: t.elapsed(),
    }
}

/// `taucli --run-dir RUN ARGS...`
fn taucli(run: &Path, args: &[&str]) -> Out {
    let mut c = Command::new(CLI);
    c.env_remove("TAU_RUN_DIR")
        .arg("--run-dir")
        .arg(run)
        .args(args);
    run_cmd(c)
}

/// taucli as uid/gid 65534 (nobody:nogroup) with no supplementary groups.
fn taucli_nobody(run: &Path, args: &[&str]) -> Out {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(CLI)
        .arg("--run-dir")
        .arg(run)
        .args(args)
        .env_remove("TAU_RUN_DIR");
    run_cmd(c)
}

// ---------------------------------------------------------------------------------------------
// tau-init in a PID namespace
// ---------------------------------------------------------------------------------------------

/// The log for failure messages (lines cut at 300 bytes, at most 150 lines).
fn ctx_short_lines(log: &str) -> String {
    let lines: Vec<&str> = log
        .lines()
        .map(|l| if l.len() > 300 { &l[..300] } else { l })
        .collect();
    log_tail(&lines, 150)
}

/// `common::NsInit` (tau-init under unshare) plus its run dir, for taucli. Dropping it tries
/// `taucli poweroff` first, then kills unshare's process group; `NsInit` then kills what is
/// left and waits.
struct Ns {
    init: NsInit,
    run: PathBuf,
}

impl Deref for Ns {
    type Target = NsInit;
    fn deref(&self) -> &NsInit {
        &self.init
    }
}

impl DerefMut for Ns {
    fn deref_mut(&mut self) -> &mut NsInit {
        &mut self.init
    }
}

impl Ns {
    /// Starts tau-init on `dir` and waits until it answers `status`.
    fn start(dir: &TestDir) -> Ns {
        Self::start_with(dir, &dir.run(), true)
    }

    /// Starts tau-init with `--run-dir RUN_ARG` and the test dir as working directory; with
    /// `check`, waits until `status` is answered (at the absolute run dir).
    fn start_with(dir: &TestDir, run_arg: &Path, check: bool) -> Ns {
        let mut cmd = unshare_tau_init(dir, run_arg);
        cmd.current_dir(&dir.path).process_group(0);
        let ns = Ns {
            init: NsInit::spawn(cmd, ctx_short_lines),
            run: dir.run(),
        };
        if !check {
            return ns;
        }
        let up = wait_until(Duration::from_secs(10), || ns.cli(&["status"]).code == 0);
        assert!(up, "tau-init does not answer `status`{}", ns.ctx());
        ns
    }

    fn count_log(&self, pat: &str) -> usize {
        self.log().lines().filter(|l| l.contains(pat)).count()
    }

    /// Rejected requests on the console: the first few of each wake-up one per line, the rest
    /// summed up as "control: N more requests rejected".
    fn count_rejections(&self) -> usize {
        let summed: usize = self
            .log()
            .lines()
            .filter_map(|l| {
                l.split("control: ")
                    .nth(1)?
                    .strip_suffix(" more requests rejected (see taucli logs)")?
                    .parse::<usize>()
                    .ok()
            })
            .sum();
        self.count_log("control: rejected request") + summed
    }

    fn cli(&self, args: &[&str]) -> Out {
        taucli(&self.run, args)
    }

    /// `taucli ARGS --json`, which must succeed.
    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let o = self.cli(&a);
        assert_eq!(o.code, 0, "taucli {args:?} failed: {o:?}{}", self.ctx());
        o.json()
    }

    fn units(&self) -> Vec<Value> {
        self.json(&["status"])["units"]
            .as_array()
            .cloned()
            .expect("units array")
    }

    fn unit(&self, name: &str) -> Value {
        self.units()
            .into_iter()
            .find(|u| u["name"] == name)
            .unwrap_or_else(|| panic!("no unit {name} in status{}", self.ctx()))
    }

    /// Polls `status` until `pred` holds for `name`; returns that row.
    fn wait_unit(
        &self,
        name: &str,
        timeout: Duration,
        what: &str,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Value {
        let mut last = Value::Null;
        let ok = wait_until(timeout, || {
            last = self
                .units()
                .into_iter()
                .find(|u| u["name"] == name)
                .unwrap_or(Value::Null);
            pred(&last)
        });
        assert!(
            ok,
            "{name} never became {what} within {timeout:?}; last: {last}{}",
            self.ctx()
        );
        last
    }

    fn wait_running(&self, name: &str) -> Value {
        self.wait_unit(name, Duration::from_secs(10), "running", |u| {
            u["state"] == "running" && u["pid"].is_i64()
        })
    }

    /// Namespace pid → host pid, for every process of the namespace.
    fn pid_map(&self) -> HashMap<i32, i32> {
        let mut m = HashMap::new();
        for p in host_procs() {
            if pid_ns_link(p.pid).as_deref() != Some(self.ns_link.as_str()) {
                continue;
            }
            let Ok(st) = fs::read_to_string(format!("/proc/{}/status", p.pid)) else {
                continue;
            };
            if let Some(line) = st.lines().find(|l| l.starts_with("NSpid:")) {
                let ids: Vec<i32> = line[6..]
                    .split_whitespace()
                    .filter_map(|s| s.parse().ok())
                    .collect();
                if let Some(&inner) = ids.last() {
                    m.insert(inner, p.pid);
                }
            }
        }
        m
    }

    fn host_pid(&self, ns_pid: i64) -> i32 {
        let m = self.pid_map();
        *m.get(&(ns_pid as i32))
            .unwrap_or_else(|| panic!("namespace pid {ns_pid} has no host process: {m:?}"))
    }

    fn pid1_alive(&self) -> bool {
        alive(self.pid1) && pid_ns_link(self.pid1).as_deref() == Some(self.ns_link.as_str())
    }

    fn ns_leftovers(&self) -> Vec<Proc> {
        host_procs()
            .into_iter()
            .filter(|p| {
                p.pid == self.pid1 || pid_ns_link(p.pid).as_deref() == Some(self.ns_link.as_str())
            })
            .collect()
    }

    /// `taucli CMD` (poweroff or reboot) answers ok, tau-init goes away, the namespace empties.
    /// Returns unshare's exit status.
    fn go_down(&mut self, cmd: &str) -> ExitStatus {
        let o = self.cli(&[cmd, "--json"]);
        assert_eq!(o.code, 0, "taucli {cmd}: {o:?}{}", self.ctx());
        assert_eq!(o.json(), json!({ "shutdown": cmd }));
        let st = self.wait_exit(Duration::from_secs(20));
        assert!(
            st.is_some(),
            "tau-init still up 20 s after `taucli {cmd}`{}",
            self.ctx()
        );
        self.join_reader();
        let gone = wait_until(Duration::from_secs(5), || self.ns_leftovers().is_empty());
        assert!(
            gone,
            "namespace not empty after {cmd}: {:?}{}",
            self.ns_leftovers(),
            self.ctx()
        );
        assert!(
            self.log().contains(&format!("shutdown: {cmd}")),
            "no `shutdown: {cmd}`{}",
            self.ctx()
        );
        // Once gone, the control FIFO has no reader: unreachable.
        let o = self.cli(&["status", "--timeout", "500"]);
        assert_eq!(o.code, 3, "status after {cmd}: {o:?}");
        st.unwrap_or_else(|| unreachable!())
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        if self.status.is_none() {
            // Orderly first, then by force: never leave processes behind.
            let _ = taucli(&self.run, &["poweroff", "--timeout", "1000"]);
            if self.wait_exit(Duration::from_secs(5)).is_none() {
                let _ = kill(Pid::from_raw(-(self.child.id() as i32)), Signal::SIGKILL);
                // `NsInit`'s drop then SIGKILLs PID 1 and unshare and waits for them.
            }
        }
    }
}

fn names(units: &[Value]) -> Vec<String> {
    units
        .iter()
        .map(|u| u["name"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// Checks the documented fields of every `status --json` row.
fn check_status_rows(units: &[Value]) {
    for u in units {
        assert!(u["name"].is_string(), "name: {u}");
        let st = u["state"].as_str().unwrap_or_else(|| panic!("state: {u}"));
        assert!(
            STATES.contains(&st),
            "state {st:?} not one of {STATES:?}: {u}"
        );
        assert!(
            u["pid"].is_null() || u["pid"].as_i64().is_some_and(|p| p > 1),
            "pid: {u}"
        );
        assert!(
            ["critical", "high", "normal", "low", "background"]
                .contains(&u["priority"].as_str().unwrap_or("?")),
            "priority: {u}"
        );
        assert!(u["restarts"].is_u64(), "restarts: {u}");
        if st == "running" {
            assert!(u["pid"].is_i64(), "running without pid: {u}");
        }
        if st == "stopped" || st == "failed" || st == "backoff" {
            assert!(u["pid"].is_null(), "{st} with a pid: {u}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Every command, text and JSON
// ---------------------------------------------------------------------------------------------

/// status, start, stop, restart, safe-mode, processes, recovery, logs, config, health,
/// resources, unknown unit and poweroff, each in text and JSON, against one tau-init.
#[test]
fn every_command_text_and_json_then_poweroff() {
    let _g = ns_test_guard!("every_command_text_and_json_then_poweroff");
    let dir = TestDir::new("cmds");
    dir.config("log_level = \"info\"");
    dir.unit(
        "alpha",
        "exec = [\"/bin/sleep\", \"1000\"]\npriority = \"high\"\ncritical = true\n",
    );
    dir.unit(
        "beta",
        "exec = [\"/bin/sleep\", \"1000\"]\nafter = [\"alpha\"]\nrequires = [\"alpha\"]\n",
    );
    dir.unit(
        "gamma",
        "exec = [\"/bin/sleep\", \"1000\"]\nenabled = false\npriority = \"low\"\n",
    );
    dir.unit("delta", SLEEPER);
    dir.unit(
        "refuge",
        "exec = [\"/bin/sleep\", \"1000\"]\nsafe_mode = true\npriority = \"background\"\n",
    );
    dir.unit(
        "crashy",
        "exec = [\"/bin/sh\", \"-c\", \"exit 3\"]\n[recovery]\nstrategy = \"notify_admin\"\n",
    );
    let mut ns = Ns::start(&dir);
    for u in ["alpha", "beta", "delta", "refuge"] {
        ns.wait_running(u);
    }
    ns.wait_unit("crashy", Duration::from_secs(10), "failed", |u| {
        u["state"] == "failed"
    });

    // --- status (JSON) ---
    let st = ns.json(&["status"]);
    assert_eq!(st["mode"], "normal");
    assert_eq!(st["shutting_down"], false);
    assert!(st["orphans_reaped"].is_u64(), "{st}");
    assert_eq!(st["handler_panics"], 0, "{st}");
    let units = st["units"].as_array().unwrap().clone();
    check_status_rows(&units);
    let mut got = names(&units);
    got.sort();
    assert_eq!(got, ["alpha", "beta", "crashy", "delta", "gamma", "refuge"]);
    let pos = |n: &str| names(&units).iter().position(|x| x == n).unwrap();
    assert!(
        pos("alpha") < pos("beta"),
        "start order puts alpha (high, required) before beta: {:?}",
        names(&units)
    );
    let row = |n: &str| units.iter().find(|u| u["name"] == n).unwrap().clone();
    assert_eq!(row("alpha")["priority"], "high");
    assert_eq!(row("alpha")["critical"], true);
    assert_eq!(row("beta")["priority"], "normal");
    assert_eq!(row("gamma")["state"], "stopped");
    assert_eq!(row("gamma")["pid"], Value::Null);
    assert_eq!(row("crashy")["state"], "failed");
    assert_eq!(row("crashy")["last_exit"], "exit:3");
    assert_eq!(row("alpha")["restarts"], 0);
    // The pid is a real process of the namespace: /bin/sleep.
    let alpha_host = ns.host_pid(row("alpha")["pid"].as_i64().unwrap());
    assert_eq!(parse_stat(alpha_host).unwrap().0, "sleep");

    // --- status (text) ---
    let o = ns.cli(&["status"]);
    assert_eq!(o.code, 0, "{o:?}");
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(lines[0], "mode: normal");
    let head: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        head,
        [
            "UNIT",
            "STATE",
            "PID",
            "PRIORITY",
            "CRITICAL",
            "RESTARTS",
            "LAST-EXIT",
            "REASON"
        ]
    );
    assert_eq!(lines.len(), 2 + 6, "{}", o.stdout);
    let alpha_line: Vec<&str> = lines
        .iter()
        .find(|l| l.starts_with("alpha "))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        alpha_line[..6],
        [
            "alpha",
            "running",
            &row("alpha")["pid"].to_string(),
            "high",
            "yes",
            "0"
        ]
    );
    let crashy_line: Vec<&str> = lines
        .iter()
        .find(|l| l.starts_with("crashy "))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        crashy_line[..7],
        ["crashy", "failed", "-", "normal", "no", "0", "exit:3"]
    );

    // --- status UNIT ---
    let one = ns.json(&["status", "beta"]);
    assert_eq!(names(one["units"].as_array().unwrap()), ["beta"]);
    assert_eq!(one["units"][0]["pid"], row("beta")["pid"]);
    let o = ns.cli(&["status", "beta"]);
    assert_eq!(o.code, 0);
    assert_eq!(o.stdout.lines().count(), 3, "{}", o.stdout);
    assert!(
        o.stdout.lines().nth(2).unwrap().starts_with("beta "),
        "{}",
        o.stdout
    );

    // --- unknown unit: exit 1, for reads and writes, text and JSON ---
    for cmd in ["status", "start", "stop", "restart"] {
        let o = ns.cli(&[cmd, "no-such-unit"]);
        assert_eq!(o.code, 1, "{cmd}: {o:?}");
        assert!(
            o.stderr.contains("no such unit: no-such-unit"),
            "{cmd}: {o:?}"
        );
        let o = ns.cli(&[cmd, "no-such-unit", "--json"]);
        assert_eq!(o.code, 1, "{cmd}: {o:?}");
        assert_eq!(o.json(), json!({ "error": "no such unit: no-such-unit" }));
    }

    // --- start (JSON) / stop (text) ---
    let r = ns.json(&["start", "gamma"]);
    assert_eq!(r["unit"], "gamma");
    assert!(
        ["starting", "running"].contains(&r["state"].as_str().unwrap()),
        "{r}"
    );
    let g = ns.wait_running("gamma");
    let gamma_host = ns.host_pid(g["pid"].as_i64().unwrap());
    let o = ns.cli(&["stop", "gamma"]);
    assert_eq!(o.code, 0, "{o:?}");
    assert!(o.stdout.contains("unit: gamma\n"), "{o:?}");
    ns.wait_unit("gamma", Duration::from_secs(5), "stopped", |u| {
        u["state"] == "stopped" && u["pid"].is_null()
    });
    assert!(
        wait_until(Duration::from_secs(3), || !alive(gamma_host)),
        "gamma's sleep still alive after stop"
    );
    // start (text) then stop (JSON)
    let o = ns.cli(&["start", "gamma"]);
    assert_eq!(o.code, 0, "{o:?}");
    assert!(o.stdout.contains("unit: gamma\n"), "{o:?}");
    ns.wait_running("gamma");
    let r = ns.json(&["stop", "gamma"]);
    assert_eq!(r["unit"], "gamma");
    assert!(
        ["stopping", "stopped"].contains(&r["state"].as_str().unwrap()),
        "{r}"
    );
    ns.wait_unit("gamma", Duration::from_secs(5), "stopped", |u| {
        u["state"] == "stopped"
    });
    // A stopped unit stays stopped (not restarted as a crash).
    thread::sleep(Duration::from_millis(300));
    assert_eq!(ns.unit("gamma")["state"], "stopped");

    // --- restart: a new pid, not a failure ---
    let d0 = ns.unit("delta");
    let old_pid = d0["pid"].as_i64().unwrap();
    let old_host = ns.host_pid(old_pid);
    let r = ns.json(&["restart", "delta"]);
    assert_eq!(r["unit"], "delta");
    let d1 = ns.wait_unit(
        "delta",
        Duration::from_secs(5),
        "running with a new pid",
        |u| u["state"] == "running" && u["pid"].is_i64() && u["pid"] != old_pid,
    );
    assert!(!alive(old_host), "old delta process survived restart");
    assert_eq!(
        d1["restarts"], 0,
        "an admin restart is not a recovery restart: {d1}"
    );
    assert_eq!(d1["attempts"], 0, "{d1}");
    let o = ns.cli(&["restart", "delta"]);
    assert_eq!(o.code, 0, "{o:?}");
    assert!(o.stdout.contains("unit: delta\n"), "{o:?}");
    ns.wait_unit(
        "delta",
        Duration::from_secs(5),
        "running with a third pid",
        |u| {
            u["state"] == "running"
                && u["pid"].is_i64()
                && u["pid"] != old_pid
                && u["pid"] != d1["pid"]
        },
    );

    // --- processes ---
    let p = ns.json(&["processes"]);
    let procs = p["processes"].as_array().unwrap();
    let mut punits: Vec<&str> = procs.iter().map(|p| p["unit"].as_str().unwrap()).collect();
    punits.sort();
    assert_eq!(punits, ["alpha", "beta", "delta", "refuge"], "{p}");
    for pr in procs {
        assert_eq!(
            pr["pid"],
            ns.unit(pr["unit"].as_str().unwrap())["pid"],
            "{pr}"
        );
        assert!(
            pr["rss_kb"].as_u64().is_some_and(|k| k > 0),
            "rss_kb of a live sleep: {pr}"
        );
        assert_eq!(pr["state"], "running");
    }
    let pc = ns.json(&["processes", "--critical"]);
    let crit: Vec<&str> = pc["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["unit"].as_str().unwrap())
        .collect();
    assert_eq!(crit, ["alpha"], "{pc}");
    let o = ns.cli(&["processes"]);
    assert_eq!(o.code, 0);
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["PID", "UNIT", "STATE", "PRIORITY", "RSS-KB", "UPTIME"]
    );
    assert_eq!(lines.len(), 5, "{}", o.stdout);
    let o = ns.cli(&["processes", "--critical"]);
    assert_eq!(o.code, 0);
    assert_eq!(o.stdout.lines().count(), 2, "{}", o.stdout);
    assert!(
        o.stdout.lines().nth(1).unwrap().split_whitespace().nth(1) == Some("alpha"),
        "{}",
        o.stdout
    );

    // --- recovery [--history] ---
    let rv = ns.json(&["recovery"]);
    assert_eq!(rv["mode"], "normal");
    assert!(
        rv.get("history").is_none(),
        "history without --history: {rv}"
    );
    assert_eq!(rv["crashes_recorded"], 1, "{rv}");
    let rec = |v: &Value, n: &str| {
        v["units"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["name"] == n)
            .unwrap()
            .clone()
    };
    let c = rec(&rv, "crashy");
    assert_eq!(
        (
            c["strategy"].clone(),
            c["attempts"].clone(),
            c["max_attempts"].clone()
        ),
        (json!("notify_admin"), json!(1), json!(3))
    );
    assert_eq!(c["state"], "failed");
    let d = rec(&rv, "delta");
    assert_eq!(
        (d["attempts"].clone(), d["restarts"].clone()),
        (json!(0), json!(0)),
        "restart counted as a failure: {d}"
    );
    let rh = ns.json(&["recovery", "--history"]);
    let hist = rh["history"].as_array().unwrap();
    assert_eq!(hist.len(), 1, "{rh}");
    assert_eq!(hist[0]["unit"], "crashy");
    assert_eq!(hist[0]["exit"], json!({ "kind": "exited", "code": 3 }));
    assert_eq!(hist[0]["action"], "notify_admin");
    assert_eq!(hist[0]["attempt"], 1);
    let o = ns.cli(&["recovery"]);
    assert_eq!(o.code, 0);
    assert!(!o.stdout.contains("crash history:"), "{}", o.stdout);
    let cl: Vec<&str> = o
        .stdout
        .lines()
        .find(|l| l.starts_with("crashy "))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        cl,
        ["crashy", "notify_admin", "1/3", "0", "exit:3", "failed"]
    );
    let o = ns.cli(&["recovery", "--history"]);
    assert_eq!(o.code, 0);
    let after: Vec<&str> = o
        .stdout
        .split("crash history:\n")
        .nth(1)
        .expect("history section")
        .lines()
        .collect();
    assert_eq!(after.len(), 2, "{}", o.stdout);
    let hl: Vec<&str> = after[1].split_whitespace().collect();
    assert_eq!(
        (hl[1], hl[2], hl[5], hl[6]),
        ("crashy", "exit:3", "1", "notify_admin"),
        "{}",
        o.stdout
    );

    // --- logs --recent N ---
    let lg = ns.json(&["logs", "--recent", "5"]);
    let recs = lg["records"].as_array().unwrap();
    assert_eq!(recs.len(), 5, "{lg}");
    let seqs: Vec<u64> = recs.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "not consecutive: {seqs:?}"
    );
    assert!(lg["last_seq"].as_u64().unwrap() >= seqs[4], "{lg}");
    for r in recs {
        assert!(
            ["error", "warn", "info", "debug"].contains(&r["level"].as_str().unwrap()),
            "{r}"
        );
        assert!(r["time_ms"].as_u64().unwrap() > 1_600_000_000_000, "{r}");
        assert!(r["message"].is_string());
    }
    let o = ns.cli(&["logs", "--recent", "3"]);
    assert_eq!(o.code, 0);
    assert_eq!(o.stdout.lines().count(), 3, "{}", o.stdout);
    for l in o.stdout.lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        let (sec, ms) = w[0].split_once('.').expect("time");
        assert!(sec.parse::<u64>().is_ok() && ms.len() == 3, "{l}");
        assert!(["error", "warn", "info", "debug"].contains(&w[1]), "{l}");
    }

    // --- logs --stats ---
    let s = ns.json(&["logs", "--stats"])["stats"].clone();
    for k in [
        "error", "warn", "info", "debug", "kept", "dropped", "capacity", "last_seq",
    ] {
        assert!(s[k].is_u64(), "{k} in {s}");
    }
    assert_eq!(s["capacity"], 1000);
    let total: u64 = ["error", "warn", "info", "debug"]
        .iter()
        .map(|k| s[*k].as_u64().unwrap())
        .sum();
    assert_eq!(
        total,
        s["last_seq"].as_u64().unwrap(),
        "per-level counts must add up to the records logged: {s}"
    );
    assert_eq!(
        s["kept"].as_u64().unwrap() + s["dropped"].as_u64().unwrap(),
        total,
        "{s}"
    );
    assert!(
        s["error"].as_u64().unwrap() >= 1,
        "the notify_admin alert is an error: {s}"
    );
    assert!(
        s["warn"].as_u64().unwrap() >= 1,
        "the crash is a warning: {s}"
    );
    let o = ns.cli(&["logs", "--stats"]);
    assert_eq!(o.code, 0);
    assert!(
        o.stdout
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["capacity", "1000"]),
        "{}",
        o.stdout
    );

    // --- logs --unit U ---
    let lu = ns.json(&["logs", "--unit", "gamma", "--recent", "1000"]);
    let recs = lu["records"].as_array().unwrap();
    assert!(!recs.is_empty());
    for r in recs {
        assert!(
            r["unit"] == "gamma" || r["message"].as_str().unwrap().starts_with("gamma:"),
            "foreign record: {r}"
        );
    }
    let started = recs
        .iter()
        .filter(|r| {
            r["message"]
                .as_str()
                .unwrap()
                .starts_with("gamma: started, pid")
        })
        .count();
    assert_eq!(started, 2, "gamma was started twice: {lu}");
    assert!(
        recs.iter()
            .any(|r| r["message"].as_str().unwrap().starts_with("gamma: stopped")),
        "{lu}"
    );
    let o = ns.cli(&["logs", "--unit", "crashy", "--recent", "1000"]);
    assert_eq!(o.code, 0);
    assert!(
        o.stdout.contains("crashy: crash recorded: exit:3"),
        "{}",
        o.stdout
    );
    assert!(!o.stdout.contains("gamma"), "{}", o.stdout);

    // --- config ---
    let cf = ns.json(&["config"]);
    assert_eq!(cf["file"], dir.p("tau.toml").display().to_string());
    assert_eq!(cf["file_loaded"], true);
    let v = &cf["values"];
    assert_eq!(
        v["system.run_dir"],
        json!({ "value": dir.run().display().to_string(), "source": "command line" })
    );
    assert_eq!(v["system.units_dir"]["source"], "command line");
    assert_eq!(
        v["system.log_level"],
        json!({ "value": "info", "source": "file" })
    );
    assert_eq!(
        v["system.shutdown_kill_timeout_ms"],
        json!({ "value": 1000, "source": "file" })
    );
    assert_eq!(
        v["system.control_group"],
        json!({ "value": "", "source": "default" })
    );
    assert_eq!(
        v["crash_recovery.max_recovery_attempts"],
        json!({ "value": 3, "source": "default" })
    );
    let o = ns.cli(&["config"]);
    assert_eq!(o.code, 0);
    assert_eq!(
        o.stdout.lines().next().unwrap(),
        format!("file: {}", dir.p("tau.toml").display())
    );
    let cols = |k: &str| -> Vec<String> {
        o.stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(k))
            .unwrap_or_else(|| panic!("no {k} in {}", o.stdout))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        cols("system.run_dir"),
        [
            "system.run_dir".to_string(),
            dir.run().display().to_string(),
            "command".into(),
            "line".into()
        ]
    );
    assert_eq!(
        cols("system.log_level"),
        ["system.log_level", "info", "file"]
    );
    assert_eq!(
        cols("crash_recovery.max_recovery_attempts"),
        ["crash_recovery.max_recovery_attempts", "3", "default"]
    );

    // --- health and resources: not available yet ---
    for cmd in [
        &["health"][..],
        &["resources"],
        &["resources", "--cpu", "--memory"],
    ] {
        let o = ns.cli(cmd);
        assert_eq!(o.code, 1, "{cmd:?}: {o:?}");
        assert!(o.stderr.contains("not available yet"), "{cmd:?}: {o:?}");
        assert!(o.stdout.is_empty(), "{o:?}");
        let mut j = cmd.to_vec();
        j.push("--json");
        let o = ns.cli(&j);
        assert_eq!(o.code, 1, "{cmd:?}: {o:?}");
        assert!(
            o.json()["error"]
                .as_str()
                .unwrap()
                .contains("not available yet"),
            "{o:?}"
        );
    }

    // --- safe-mode ---
    let refuge_pid = ns.unit("refuge")["pid"].clone();
    let sm = ns.json(&["safe-mode"]);
    assert_eq!(sm, json!({ "mode": "safe" }));
    for u in ["alpha", "beta", "delta"] {
        ns.wait_unit(u, Duration::from_secs(5), "stopped", |r| {
            r["state"] == "stopped" && r["pid"].is_null()
        });
    }
    let st = ns.json(&["status"]);
    assert_eq!(st["mode"], "safe");
    let refuge = st["units"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "refuge")
        .unwrap();
    assert_eq!(
        refuge["pid"], refuge_pid,
        "a safe_mode unit keeps running: {refuge}"
    );
    assert!(ns.cli(&["recovery"]).stdout.starts_with("mode: safe\n"));
    let o = ns.cli(&["safe-mode"]);
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(o.stdout, "mode: safe\n");

    // Every mutating command was audited as root.
    let audit = dir.audit();
    let cmds: Vec<&str> = audit
        .iter()
        .map(|a| a["command"].as_str().unwrap())
        .collect();
    for c in ["start", "stop", "restart", "safe-mode"] {
        assert!(cmds.contains(&c), "{c} not audited: {audit:?}");
    }
    assert!(
        !cmds.contains(&"status") && !cmds.contains(&"config"),
        "read-only commands audited: {cmds:?}"
    );
    assert!(audit.iter().all(|a| a["uid"] == 0), "{audit:?}");

    // --- poweroff ---
    let st = ns.go_down("poweroff");
    eprintln!("unshare after poweroff: {st:?}");
    assert_eq!(dir.audit().last().unwrap()["command"], "poweroff");
}

// ---------------------------------------------------------------------------------------------
// Exit codes without a namespace: unreachable (3) and usage (2)
// ---------------------------------------------------------------------------------------------

#[test]
fn unreachable_is_exit_3_within_timeout_and_bad_usage_is_exit_2() {
    let _g = lock();
    let dir = TestDir::new("unreach");

    // No run dir at all.
    let o = taucli(&dir.p("nothing-here"), &["status"]);
    assert_eq!(o.code, 3, "{o:?}");
    assert!(o.stderr.contains("unreachable"), "{o:?}");
    assert!(
        o.stderr
            .contains(&dir.p("nothing-here/control").display().to_string()),
        "{o:?}"
    );
    assert!(o.elapsed < Duration::from_secs(2), "{o:?}");
    // The same through TAU_RUN_DIR.
    let mut c = Command::new(CLI);
    c.env("TAU_RUN_DIR", dir.p("env-run"))
        .args(["status", "--json"]);
    let o = run_cmd(c);
    assert_eq!(o.code, 3, "{o:?}");
    assert!(
        o.stderr.contains("unreachable") && o.stderr.contains("env-run/control"),
        "{o:?}"
    );

    // A stale control FIFO nobody reads (tau-init dead): ENXIO, at once.
    let run = dir.p("stale");
    fs::create_dir_all(run.join("reply")).unwrap();
    fs::set_permissions(run.join("reply"), fs::Permissions::from_mode(0o1777)).unwrap();
    mkfifo(&run.join("control"), 0o600);
    let o = taucli(&run, &["status", "--timeout", "3000"]);
    assert_eq!(o.code, 3, "{o:?}");
    assert!(o.stderr.contains("unreachable"), "{o:?}");
    assert!(o.elapsed < Duration::from_millis(1500), "{o:?}");
    assert_eq!(
        fs::read_dir(run.join("reply")).unwrap().count(),
        0,
        "reply FIFO left behind"
    );

    // A reader that never answers (tau-init hung): exit 3 after --timeout, not much later.
    let _hung = OpenOptions::new()
        .read(true)
        .write(true)
        .open(run.join("control"))
        .unwrap();
    for t in ["300", "800"] {
        let o = taucli(&run, &["status", "--timeout", t]);
        let ms: u64 = t.parse().unwrap();
        assert_eq!(o.code, 3, "{o:?}");
        assert!(
            o.stderr.contains("unreachable")
                && o.stderr.contains(&format!("no reply within {t} ms")),
            "{o:?}"
        );
        assert!(o.elapsed >= Duration::from_millis(ms), "{o:?}");
        assert!(o.elapsed < Duration::from_millis(ms + 700), "{o:?}");
    }
    assert_eq!(
        fs::read_dir(run.join("reply")).unwrap().count(),
        0,
        "reply FIFO left behind after a timeout"
    );

    // Bad usage: exit 2 before any contact.
    for args in [
        &["frobnicate"][..],
        &["start"],
        &["stop"],
        &["restart"],
        &["status", "a", "b"],
        &["logs", "--recent", "many"],
        &["status", "--timeout", "soon"],
        &["--no-such-flag", "status"],
        &[],
    ] {
        let o = taucli(&run, args);
        assert_eq!(o.code, 2, "taucli {args:?}: {o:?}");
        assert!(!o.stderr.is_empty(), "{args:?}: no usage message");
    }
    let o = taucli(&run, &["--help"]);
    assert_eq!(o.code, 0, "{o:?}");
    assert!(o.stdout.contains("reexec"), "{o:?}");
}

// ---------------------------------------------------------------------------------------------
// reload and reboot
// ---------------------------------------------------------------------------------------------

#[test]
fn reload_adds_removes_changes_keeps_unchanged_and_refuses_invalid_then_reboot() {
    let _g = ns_test_guard!(
        "reload_adds_removes_changes_keeps_unchanged_and_refuses_invalid_then_reboot"
    );
    let dir = TestDir::new("reload");
    dir.config("");
    dir.unit("keep", SLEEPER);
    dir.unit("gone", SLEEPER);
    dir.unit("change", SLEEPER);
    let mut ns = Ns::start(&dir);
    let keep = ns.wait_running("keep")["pid"].as_i64().unwrap();
    let gone = ns.wait_running("gone")["pid"].as_i64().unwrap();
    let change = ns.wait_running("change")["pid"].as_i64().unwrap();
    let (keep_h, gone_h, change_h) = (ns.host_pid(keep), ns.host_pid(gone), ns.host_pid(change));
    let keep_start = start_time(keep_h);

    dir.unit("fresh", SLEEPER);
    fs::remove_file(dir.p("units/gone.toml")).unwrap();
    dir.unit("change", "exec = [\"/bin/sleep\", \"2000\"]\n");
    let r = ns.json(&["reload"]);
    assert_eq!(
        r,
        json!({ "added": ["fresh"], "changed": ["change"], "removed": ["gone"], "unchanged": ["keep"] })
    );
    ns.wait_running("fresh");
    let c = ns.wait_unit("change", Duration::from_secs(5), "restarted", |u| {
        u["state"] == "running" && u["pid"].is_i64() && u["pid"] != change
    });
    let ch = ns.host_pid(c["pid"].as_i64().unwrap());
    let cmdline = fs::read_to_string(format!("/proc/{ch}/cmdline")).unwrap();
    assert_eq!(
        cmdline, "/bin/sleep\x002000\x00",
        "changed unit runs its new definition"
    );
    assert!(
        wait_until(Duration::from_secs(3), || !alive(change_h)),
        "old instance of `change` still alive"
    );
    assert!(
        wait_until(Duration::from_secs(3), || !alive(gone_h)),
        "process of the removed unit still alive"
    );
    let mut got = names(&ns.units());
    got.sort();
    assert_eq!(got, ["change", "fresh", "keep"]);
    assert_eq!(ns.unit("keep")["pid"], keep, "unchanged unit was restarted");
    assert_eq!(
        start_time(keep_h),
        keep_start,
        "unchanged unit's process replaced"
    );
    // A change is not a crash.
    assert_eq!(ns.json(&["recovery", "--history"])["history"], json!([]));

    // Nothing changed: text output, everything unchanged.
    let o = ns.cli(&["reload"]);
    assert_eq!(o.code, 0, "{o:?}");
    let lines: Vec<&str> = o.stdout.lines().map(str::trim_end).collect();
    assert_eq!(
        lines[..3],
        ["added:", "changed:", "removed:"],
        "{}",
        o.stdout
    );
    let mut un: Vec<&str> = lines[3]
        .strip_prefix("unchanged: ")
        .unwrap()
        .split(' ')
        .collect();
    un.sort();
    assert_eq!(un, ["change", "fresh", "keep"]);

    // An invalid unit file: refused, nothing changes (not even the valid edits made alongside).
    let before = ns.units();
    fs::copy(fixture("bad-unit.toml"), dir.p("units/bad.toml")).unwrap();
    dir.unit("fresh", "exec = [\"/bin/sleep\", \"3000\"]\n");
    fs::remove_file(dir.p("units/keep.toml")).unwrap();
    let o = ns.cli(&["reload"]);
    assert_eq!(o.code, 1, "{o:?}");
    assert!(
        o.stderr.contains("reload refused, nothing changed"),
        "{o:?}"
    );
    assert!(
        o.stderr.contains("bad.toml"),
        "the error names the file: {o:?}"
    );
    let o = ns.cli(&["reload", "--json"]);
    assert_eq!(o.code, 1, "{o:?}");
    assert!(
        o.json()["error"].as_str().unwrap().contains("bogus_key"),
        "{o:?}"
    );
    thread::sleep(Duration::from_millis(300));
    let after = ns.units();
    assert_eq!(names(&after), names(&before));
    for (a, b) in after.iter().zip(&before) {
        assert_eq!(
            (&a["name"], &a["pid"], &a["state"]),
            (&b["name"], &b["pid"], &b["state"]),
            "changed by a refused reload"
        );
    }
    assert!(alive(keep_h));
    let audit = dir.audit();
    let reloads: Vec<&str> = audit
        .iter()
        .filter(|a| a["command"] == "reload")
        .map(|a| a["result"].as_str().unwrap())
        .collect();
    assert_eq!(reloads.len(), 4, "{audit:?}");
    assert_eq!(reloads[..2], ["ok", "ok"]);
    assert!(
        reloads[2].starts_with("error: reload refused"),
        "{reloads:?}"
    );

    // --- reboot ---
    let st = ns.go_down("reboot");
    eprintln!("unshare after reboot: {st:?}");
    assert!(
        !ns.log().contains("shutdown: poweroff"),
        "reboot must not power off{}",
        ns.ctx()
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Caller identity: permission denied for non-root
// ---------------------------------------------------------------------------------------------

#[test]
fn non_root_caller_reads_but_cannot_mutate_and_is_audited() {
    let _g = ns_test_guard!("non_root_caller_reads_but_cannot_mutate_and_is_audited");
    if nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(65534))
        .ok()
        .flatten()
        .is_none()
    {
        eprintln!("SKIP non_root_caller_reads_but_cannot_mutate_and_is_audited: no group 65534");
        return;
    }
    let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(65534))
        .unwrap()
        .unwrap()
        .name;
    let dir = TestDir::new("perm");
    dir.config(&format!("control_group = \"{group}\""));
    dir.unit("svc", SLEEPER);
    let mut ns = Ns::start(&dir);
    let pid = ns.wait_running("svc")["pid"].clone();

    let m = fs::metadata(dir.run().join("control")).unwrap();
    assert_eq!(
        (m.mode() & 0o7777, m.uid(), m.gid()),
        (0o620, 0, 65534),
        "control FIFO mode/owner"
    );
    let rm = fs::metadata(dir.reply_dir()).unwrap();
    assert_eq!(rm.mode() & 0o7777, 0o1733);

    // Reads work for the group member.
    let o = taucli_nobody(&dir.run(), &["status", "--json"]);
    assert_eq!(o.code, 0, "{o:?}{}", ns.ctx());
    assert_eq!(o.json()["units"][0]["pid"], pid);
    let o = taucli_nobody(&dir.run(), &["logs", "--recent", "2"]);
    assert_eq!(o.code, 0, "{o:?}");

    // Writes are refused.
    for args in [
        &["stop", "svc"][..],
        &["restart", "svc"],
        &["safe-mode"],
        &["reload"],
        &["reexec"],
        &["poweroff"],
    ] {
        let o = taucli_nobody(&dir.run(), args);
        assert_eq!(o.code, 1, "{args:?}: {o:?}");
        assert!(o.stderr.contains("permission denied"), "{args:?}: {o:?}");
    }
    let o = taucli_nobody(&dir.run(), &["stop", "svc", "--json"]);
    assert_eq!(o.code, 1);
    assert!(
        o.json()["error"]
            .as_str()
            .unwrap()
            .starts_with("permission denied"),
        "{o:?}"
    );
    thread::sleep(Duration::from_millis(300));
    assert!(
        ns.pid1_alive(),
        "tau-init went down on a refused poweroff{}",
        ns.ctx()
    );
    let s = ns.unit("svc");
    assert_eq!(
        (s["state"].clone(), s["pid"].clone()),
        (json!("running"), pid),
        "svc touched by a refused command"
    );
    assert_eq!(ns.json(&["status"])["mode"], "normal");

    let audit = dir.audit();
    let denied: Vec<&Value> = audit.iter().filter(|a| a["uid"] == 65534).collect();
    assert_eq!(denied.len(), 7, "every refused command audited: {audit:?}");
    let stop = denied[0];
    assert_eq!(stop["command"], "stop");
    assert_eq!(stop["args"], json!(["svc"]));
    assert!(
        stop["result"]
            .as_str()
            .unwrap()
            .starts_with("error: permission denied"),
        "{stop}"
    );
    assert!(stop["time_ms"].as_u64().unwrap() > 1_600_000_000_000);
    let dcmds: Vec<&str> = denied
        .iter()
        .map(|a| a["command"].as_str().unwrap())
        .collect();
    assert_eq!(
        dcmds,
        [
            "stop",
            "restart",
            "safe-mode",
            "reload",
            "reexec",
            "poweroff",
            "stop"
        ]
    );

    // Root may.
    let o = ns.cli(&["stop", "svc"]);
    assert_eq!(o.code, 0, "{o:?}");
    ns.wait_unit("svc", Duration::from_secs(5), "stopped", |u| {
        u["state"] == "stopped"
    });
    let last = dir.audit().last().cloned().unwrap();
    assert_eq!(
        (
            last["uid"].clone(),
            last["command"].clone(),
            last["args"].clone(),
            last["result"].clone()
        ),
        (json!(0), json!("stop"), json!(["svc"]), json!("ok"))
    );
    ns.go_down("poweroff");
    drop(ns);

    // Without control_group the FIFO is root's alone: a non-root client cannot even write it.
    let dir2 = TestDir::new("perm-root-only");
    dir2.config("");
    dir2.unit("svc", SLEEPER);
    let mut ns = Ns::start(&dir2);
    let m = fs::metadata(dir2.run().join("control")).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o600, 0, 0));
    for args in [&["status"][..], &["stop", "svc"]] {
        let o = taucli_nobody(&dir2.run(), args);
        assert_eq!(o.code, 1, "{args:?}: {o:?}");
        assert!(o.stderr.contains("permission denied"), "{args:?}: {o:?}");
    }
    assert_eq!(ns.unit("svc")["state"], "running");
    assert!(
        dir2.audit().is_empty(),
        "nothing reached tau-init: {:?}",
        dir2.audit()
    );
    ns.go_down("poweroff");
}

// ---------------------------------------------------------------------------------------------
// 3. 1,000 hostile requests, then a valid one
// ---------------------------------------------------------------------------------------------

#[test]
fn thousand_garbage_requests_then_valid_one_is_answered() {
    let _g = ns_test_guard!("thousand_garbage_requests_then_valid_one_is_answered");
    let dir = TestDir::new("garbage");
    dir.config("");
    dir.unit("one", SLEEPER);
    dir.unit("two", SLEEPER);
    let ns = Ns::start(&dir);
    let one = ns.wait_running("one")["pid"].clone();
    let two = ns.wait_running("two")["pid"].clone();
    let rejected0 = ns.count_rejections();

    // Where answers that should come go: one FIFO, read by a thread all along.
    let collector = dir.reply_dir().join("collector");
    mkfifo(&collector, 0o600);
    let mut creader = open_read_nb(&collector);
    // A FIFO outside the reply dir, and names that lead to it: must never be written.
    let foreign = dir.p("foreign");
    mkfifo(&foreign, 0o600);
    let mut freader = open_read_nb(&foreign);
    std::os::unix::fs::symlink(&foreign, dir.reply_dir().join("link")).unwrap();
    let hard = dir.reply_dir().join("hardlink");
    fs::hard_link(&foreign, &hard).unwrap();

    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut buf: Vec<u8> = Vec::new();
    let mut expect_rejected = 0usize;
    let mut expect_ok = 0usize;
    let mut expect_err: Vec<&str> = Vec::new();
    for i in 0..1000 {
        match i % 10 {
            0 => {
                // Binary garbage (no newline inside).
                let n = 1 + rng.below(300) as usize;
                buf.extend((0..n).map(|_| match rng.below(256) as u8 {
                    b'\n' => 0xfe,
                    b => b,
                }));
                buf.push(b'\n');
                expect_rejected += 1;
            }
            1 => {
                // Over-long lines, some of them well-formed requests.
                let n = MAX_REQUEST + rng.below(20_000) as usize;
                if i % 20 == 1 {
                    let mut l = request(&collector, "status", &[], json!({}));
                    l.pop();
                    l.truncate(l.len() - 1);
                    l.extend(std::iter::repeat_n(b' ', n));
                    l.extend_from_slice(b"}\n");
                    buf.extend(l);
                } else {
                    buf.extend(std::iter::repeat_n(b'A' + (i % 26) as u8, n));
                    buf.push(b'\n');
                }
                expect_rejected += 1;
            }
            2 => {
                // No TAU/1 marker (or a wrong one).
                let l = match i % 3 {
                    0 => format!("hello world {i}\n"),
                    1 => format!(
                        "{{\"reply\":\"{}\",\"cmd\":\"status\"}}\n",
                        collector.display()
                    ),
                    _ => format!(
                        "TAU/2 {{\"reply\":\"{}\",\"cmd\":\"status\"}}\n",
                        collector.display()
                    ),
                };
                buf.extend(l.as_bytes());
                expect_rejected += 1;
            }
            3 => {
                // A client died mid-request (no newline); the next request on that line counts.
                let cut = format!(
                    "TAU/1 {{\"reply\":\"{}/dead.{i}\",\"cm",
                    dir.reply_dir().display()
                );
                buf.extend(cut.as_bytes());
                buf.extend(request(&collector, "status", &["one"], json!({})));
                expect_ok += 1;
            }
            4 => {
                buf.extend(
                    format!("TAU/1 {{\"reply\":\"reply/rel.{i}\",\"cmd\":\"status\"}}\n")
                        .as_bytes(),
                );
                expect_rejected += 1;
            }
            5 => {
                let target = match i % 4 {
                    0 => foreign.clone(),
                    1 => dir.reply_dir().join("../foreign"),
                    2 => dir.reply_dir().join("link"),
                    _ => hard.clone(),
                };
                buf.extend(request(&target, "status", &[], json!({})));
                expect_rejected += 1;
            }
            6 => {
                let l = format!(
                    "TAU/1 {{\"reply\":\"{}\",\"cmd\":\"status\",\"args\":[],\"flags\":{{}},\"bogus\":{i}}}\n",
                    collector.display()
                );
                buf.extend(l.as_bytes());
                expect_rejected += 1;
                expect_err.push("unknown field `bogus`");
            }
            7 => {
                buf.extend(request(&collector, "frobnicate", &[], json!({})));
                expect_rejected += 1;
                expect_err.push("unknown command \"frobnicate\"");
            }
            8 => {
                let l = match i % 3 {
                    0 => "TAU/1 {not json\n".to_string(),
                    1 => "TAU/1 \n".to_string(),
                    _ => "TAU/1 {\"reply\":42,\"cmd\":\"status\"}\n".to_string(),
                };
                buf.extend(l.as_bytes());
                expect_rejected += 1;
            }
            _ => {
                // Well-formed, but its reply FIFO does not exist.
                buf.extend(request(
                    &dir.reply_dir().join(format!("missing.{i}")),
                    "status",
                    &[],
                    json!({}),
                ));
                expect_rejected += 1;
            }
        }
    }
    // The size limit is exact: 4096 bytes with the newline is fine, 4097 is not.
    let pad = |total: usize| {
        let mut l = request(&collector, "status", &["two"], json!({}));
        l.pop();
        l.pop();
        l.extend(std::iter::repeat_n(b' ', total - l.len() - 2));
        l.extend_from_slice(b"}\n");
        assert_eq!(l.len(), total);
        l
    };
    buf.extend(pad(MAX_REQUEST));
    expect_ok += 1;
    buf.extend(pad(MAX_REQUEST + 1));
    expect_rejected += 1;

    // Everything through one writer, in blocking writes.
    let mut w = OpenOptions::new()
        .write(true)
        .open(dir.run().join("control"))
        .unwrap();
    w.write_all(&buf).unwrap();
    drop(w);

    let expected_replies = expect_ok + expect_err.len();
    let mut got = Vec::new();
    let done = wait_until(Duration::from_secs(20), || {
        got.extend(drain_now(&mut creader));
        got.iter().filter(|&&b| b == b'\n').count() >= expected_replies
    });
    let replies: Vec<Value> = String::from_utf8_lossy(&got)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("reply {l:?}: {e}")))
        .collect();
    assert!(
        done,
        "{} of {expected_replies} replies{}",
        replies.len(),
        ns.ctx()
    );
    let oks: Vec<&Value> = replies.iter().filter(|r| r["ok"] == true).collect();
    assert_eq!(oks.len(), expect_ok, "answered requests");
    assert_eq!(oks[0]["data"]["units"][0]["name"], "one");
    assert_eq!(oks[0]["data"]["units"][0]["pid"], one);
    assert_eq!(
        oks.last().unwrap()["data"]["units"][0]["name"],
        "two",
        "the 4096-byte request"
    );
    let errs: Vec<&str> = replies
        .iter()
        .filter(|r| r["ok"] == false)
        .map(|r| r["error"].as_str().unwrap())
        .collect();
    assert_eq!(errs.len(), expect_err.len());
    for (e, want) in errs.iter().zip(&expect_err) {
        assert!(e.contains(want), "error {e:?} should mention {want:?}");
        assert!(replies.iter().all(|r| r["v"] == 1));
    }
    thread::sleep(Duration::from_millis(200));
    assert!(
        drain_now(&mut creader).is_empty(),
        "more replies than requests that deserve one"
    );
    assert!(
        drain_now(&mut freader).is_empty(),
        "tau-init wrote to a FIFO outside its reply dir"
    );
    assert!(ns.pid1_alive(), "tau-init died{}", ns.ctx());
    let rejected = ns.count_rejections() - rejected0;
    assert_eq!(rejected, expect_rejected, "rejections logged{}", ns.ctx());

    // And the next normal client is answered correctly.
    let st = ns.json(&["status"]);
    assert_eq!(names(st["units"].as_array().unwrap()), ["one", "two"]);
    assert_eq!(st["units"][0]["pid"], one);
    assert_eq!(st["units"][1]["pid"], two);
    assert_eq!(st["units"][0]["state"], "running");
    assert!(
        dir.audit().is_empty(),
        "no mutating command got through: {:?}",
        dir.audit()
    );
}

// ---------------------------------------------------------------------------------------------
// 4. 100 concurrent clients
// ---------------------------------------------------------------------------------------------

#[test]
fn hundred_concurrent_clients_all_answered() {
    let _g = ns_test_guard!("hundred_concurrent_clients_all_answered");
    let dir = TestDir::new("concurrent");
    dir.config("");
    for i in 0..5 {
        dir.unit(&format!("u{i}"), SLEEPER);
    }
    let ns = Ns::start(&dir);
    for i in 0..5 {
        ns.wait_running(&format!("u{i}"));
    }
    let expect = ns.json(&["status"]);
    let t = Instant::now();
    let children: Vec<Child> = (0..100)
        .map(|i| {
            let args: &[&str] = if i % 4 == 3 {
                &["logs", "--recent", "50", "--json"]
            } else {
                &["status", "--json"]
            };
            Command::new(CLI)
                .arg("--run-dir")
                .arg(dir.run())
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<std::process::Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let took = t.elapsed();
    let mut failures = Vec::new();
    for (i, o) in outs.iter().enumerate() {
        let err = String::from_utf8_lossy(&o.stderr);
        if o.status.code() != Some(0) {
            failures.push(format!("#{i}: {:?} {err}", o.status));
            continue;
        }
        let v: Value = match serde_json::from_slice(&o.stdout) {
            Ok(v) => v,
            Err(e) => {
                failures.push(format!("#{i}: bad JSON {e}"));
                continue;
            }
        };
        if i % 4 == 3 {
            if v["records"].as_array().is_none_or(|r| r.is_empty()) {
                failures.push(format!("#{i}: {v}"));
            }
        } else if strip_ms(&v["units"]) != strip_ms(&expect["units"]) {
            // state_ms moves on; compared without it.
            failures.push(format!("#{i}: {v}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 100 clients failed ({took:?}):\n{}{}",
        failures.len(),
        failures.join("\n"),
        ns.ctx()
    );
    assert!(ns.pid1_alive());
    assert_eq!(
        fs::read_dir(dir.reply_dir()).unwrap().count(),
        0,
        "reply FIFOs left behind"
    );
    eprintln!("100 concurrent clients answered in {took:?}");
}

fn strip_ms(units: &Value) -> Value {
    let mut u = units.clone();
    if let Some(a) = u.as_array_mut() {
        for r in a {
            if let Some(o) = r.as_object_mut() {
                o.remove("state_ms");
            }
        }
    }
    u
}

// ---------------------------------------------------------------------------------------------
// 5. Clients that do not read their replies
// ---------------------------------------------------------------------------------------------

#[test]
fn clients_that_never_read_do_not_delay_the_next_one() {
    let _g = ns_test_guard!("clients_that_never_read_do_not_delay_the_next_one");
    let dir = TestDir::new("slow");
    dir.config("");
    dir.unit("svc", SLEEPER);
    let ns = Ns::start(&dir);
    ns.wait_running("svc");

    // Fill the log ring with 1,000 records of ~3.9 KB each (rejected unknown commands are
    // logged with their name), so that `logs --recent 1000` is ~4 MB: more than a pipe holds.
    let nowhere = dir.reply_dir().join("nowhere");
    let mut w = OpenOptions::new()
        .write(true)
        .open(dir.run().join("control"))
        .unwrap();
    for i in 0..1000 {
        let name = format!("x{i:04}{}", "y".repeat(3800));
        w.write_all(&request(&nowhere, &name, &[], json!({})))
            .unwrap();
    }
    let filled = wait_until(Duration::from_secs(20), || {
        ns.json(&["logs", "--stats"])["stats"]["dropped"].as_u64() > Some(0)
    });
    assert!(filled, "log ring did not fill{}", ns.ctx());
    // A reader that does read gets the whole 4 MB reply.
    let big = ns.cli(&["logs", "--recent", "1000", "--json"]);
    assert_eq!(big.code, 0, "{:?} {:?}", big.code, big.stderr);
    let full_len = big.stdout.len();
    assert_eq!(big.json()["records"].as_array().unwrap().len(), 1000);
    assert!(full_len > 2 << 20, "reply only {full_len} bytes");

    // (a) never opened for reading; (b) opened, never read, with a ~4 MB reply (x3).
    let never = dir.reply_dir().join("never");
    mkfifo(&never, 0o600);
    let mut stuck = Vec::new();
    for k in 0..3 {
        let p = dir.reply_dir().join(format!("stuck{k}"));
        mkfifo(&p, 0o600);
        stuck.push((p.clone(), open_read_nb(&p)));
    }
    let dropped0 = ns.count_log("reader too slow");
    let t0 = Instant::now();
    w.write_all(&request(&never, "status", &[], json!({})))
        .unwrap();
    for (p, _) in &stuck {
        w.write_all(&request(p, "logs", &[], json!({ "recent": 1000 })))
            .unwrap();
    }
    let mut timings = Vec::new();
    for _ in 0..3 {
        let o = ns.cli(&["status", "--json"]);
        assert_eq!(o.code, 0, "{o:?}{}", ns.ctx());
        assert_eq!(o.json()["units"][0]["name"], "svc");
        timings.push(o.elapsed);
        assert!(
            o.elapsed < Duration::from_millis(REPLY_TIMEOUT_MS + 300),
            "status took {:?} behind clients that do not read{}",
            o.elapsed,
            ns.ctx()
        );
    }
    eprintln!("status behind 4 stuck clients: {timings:?}");
    ns.expect_log(
        &format!("reply FIFO {}: nobody is reading it", never.display()),
        Duration::from_secs(2),
    );

    // The stuck replies are dropped after REPLY_TIMEOUT_MS, having written only part.
    let ok = wait_until(Duration::from_millis(REPLY_TIMEOUT_MS + 2000), || {
        ns.count_log("reader too slow") >= dropped0 + 3
    });
    assert!(ok, "stuck replies not dropped{}", ns.ctx());
    assert!(
        t0.elapsed() >= Duration::from_millis(REPLY_TIMEOUT_MS - 50),
        "dropped before the timeout: {:?}",
        t0.elapsed()
    );
    for (p, mut f) in stuck {
        let got = drain_now(&mut f);
        assert!(!got.is_empty(), "{}: nothing written", p.display());
        assert!(got.len() < full_len, "{}: the whole reply fit", p.display());
        assert!(got.starts_with(b"{\"v\":1,\"ok\":true"), "{}", p.display());
        assert!(
            serde_json::from_slice::<Value>(&got).is_err(),
            "a truncated reply cannot parse"
        );
    }
    let o = ns.cli(&["status"]);
    assert_eq!(o.code, 0);
    assert!(o.elapsed < Duration::from_millis(500), "{o:?}");
    assert!(ns.pid1_alive());
}

// ---------------------------------------------------------------------------------------------
// 6. reexec under load
// ---------------------------------------------------------------------------------------------

const RUNNERS: usize = 50;
const BACKOFF_MS: f64 = 4000.0;

#[test]
fn reexec_keeps_50_running_units_and_the_backoff_schedule() {
    let _g = ns_test_guard!("reexec_keeps_50_running_units_and_the_backoff_schedule");
    let dir = TestDir::new("reexec");
    dir.config("");
    for i in 0..RUNNERS {
        dir.unit(&format!("run{i:02}"), SLEEPER);
    }
    fs::write(dir.p("starts"), "").unwrap();
    dir.unit(
        "flaky",
        &format!(
            r#"exec = ["/bin/sh", "-c", 'read t _ < /proc/uptime; echo "$t" >> {}; exit 7']
[recovery]
strategy = "restart_with_backoff"
backoff_initial_ms = {BACKOFF_MS}
backoff_max_ms = 60000
backoff_factor = 2.0
max_attempts = 5
"#,
            dir.p("starts").display()
        ),
    );
    let ns = Ns::start(&dir);
    let names_run: Vec<String> = (0..RUNNERS).map(|i| format!("run{i:02}")).collect();
    let ok = wait_until(Duration::from_secs(10), || {
        let u = ns.units();
        u.iter().filter(|u| u["state"] == "running").count() == RUNNERS
            && u.iter()
                .any(|u| u["name"] == "flaky" && u["state"] == "backoff")
    });
    assert!(
        ok,
        "not 50 running + flaky in backoff: {:?}{}",
        ns.units(),
        ns.ctx()
    );

    let before = ns.json(&["status"]);
    let t_before = uptime();
    let units = before["units"].as_array().unwrap();
    let flaky = units.iter().find(|u| u["name"] == "flaky").unwrap();
    let restart_in = flaky["restart_in_ms"]
        .as_u64()
        .expect("restart_in_ms in backoff") as f64;
    assert!(
        restart_in > 1500.0,
        "too little backoff left for the test ({restart_in} ms)"
    );
    let starts: Vec<f64> = fs::read_to_string(dir.p("starts"))
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(starts.len(), 1);
    // The deadline as tau-init computed it (crash + 4 s), and as seen through status.
    let deadline = t_before + restart_in / 1000.0;
    assert!(
        (deadline - (starts[0] + BACKOFF_MS / 1000.0)).abs() < 0.3,
        "deadline {deadline} vs start {}",
        starts[0]
    );
    let history_before = ns.json(&["recovery", "--history"]);
    assert_eq!(history_before["history"].as_array().unwrap().len(), 1);
    let pmap = ns.pid_map();
    let mut procs: BTreeMap<String, (Value, i32, u64)> = BTreeMap::new();
    for u in units.iter().filter(|u| u["name"] != "flaky") {
        let ns_pid = u["pid"].as_i64().unwrap() as i32;
        let host = pmap[&ns_pid];
        procs.insert(
            u["name"].as_str().unwrap().to_string(),
            (u["pid"].clone(), host, start_time(host).unwrap()),
        );
    }
    assert_eq!(procs.keys().cloned().collect::<Vec<_>>(), names_run);
    let pid1_start = start_time(ns.pid1).unwrap();

    let r = ns.json(&["reexec"]);
    assert_eq!(r, json!({ "reexec": true, "units": RUNNERS + 1 }));
    ns.expect_log(
        "resumed after re-exec with 51 units",
        Duration::from_secs(5),
    );

    // Same PID 1, same host process, in the same namespace.
    assert!(ns.pid1_alive(), "tau-init is gone after reexec{}", ns.ctx());
    assert_eq!(
        start_time(ns.pid1).unwrap(),
        pid1_start,
        "PID 1 was replaced by another process"
    );
    assert_eq!(parse_stat(ns.pid1).unwrap().0, "tau-init");
    let after = ns.json(&["status"]);
    let history_after = ns.json(&["recovery", "--history"]);
    assert!(
        uptime() < deadline - 0.2,
        "too slow to observe the backoff before its deadline"
    );
    assert_eq!(
        history_after["history"], history_before["history"],
        "crash history changed by reexec"
    );
    let a_units = after["units"].as_array().unwrap();
    assert_eq!(names(a_units), names(units), "units or order changed");
    for u in a_units {
        let n = u["name"].as_str().unwrap();
        if n == "flaky" {
            assert_eq!(u["state"], "backoff", "{u}");
            let left = u["restart_in_ms"].as_u64().unwrap() as f64;
            let now = uptime();
            assert!(
                (now + left / 1000.0 - deadline).abs() < 0.3,
                "backoff deadline moved: {u}"
            );
            continue;
        }
        let (pid, host, st) = &procs[n];
        assert_eq!(
            (&u["state"], &u["pid"]),
            (&json!("running"), pid),
            "{n} after reexec: {u}"
        );
        assert_eq!(u["restarts"], 0, "{u}");
        assert_eq!(start_time(*host), Some(*st), "{n}'s process was restarted");
    }

    // The backoff restart happens on the original schedule.
    let ok = wait_until(Duration::from_secs(8), || {
        fs::read_to_string(dir.p("starts")).unwrap().lines().count() >= 2
    });
    assert!(ok, "flaky never restarted after reexec{}", ns.ctx());
    let starts: Vec<f64> = fs::read_to_string(dir.p("starts"))
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let off_ms = (starts[1] - deadline) * 1000.0;
    assert!(
        off_ms.abs() <= 500.0,
        "restart {off_ms:.0} ms off its pre-reexec deadline{}",
        ns.ctx()
    );
    let f = ns.wait_unit("flaky", Duration::from_secs(5), "back in backoff", |u| {
        u["state"] == "backoff" && u["restarts"] == 1
    });
    assert_eq!(f["attempts"], 2, "{f}");

    // The resumed instance still knows its children: a stop is a stop, a kill is a crash.
    let (pid0, host0, _) = procs["run00"].clone();
    let o = ns.cli(&["stop", "run00"]);
    assert_eq!(o.code, 0, "{o:?}");
    ns.wait_unit("run00", Duration::from_secs(5), "stopped", |u| {
        u["state"] == "stopped" && u["pid"].is_null()
    });
    assert!(
        wait_until(Duration::from_secs(3), || !alive(host0)),
        "run00 ({pid0}) still alive"
    );
    let (pid1, host1, _) = procs["run01"].clone();
    kill(Pid::from_raw(host1), Signal::SIGKILL).unwrap();
    let u = ns.wait_unit("run01", Duration::from_secs(5), "restarted", |u| {
        u["state"] == "running" && u["pid"].is_i64() && u["pid"] != pid1
    });
    assert_eq!(u["restarts"], 1, "{u}");
    let h = ns.json(&["recovery", "--history"]);
    let last = h["history"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|c| c["unit"] == "run01")
        .cloned();
    let last = last.unwrap_or_else(|| panic!("run01's kill not recorded: {h}"));
    assert_eq!(last["exit"]["kind"], "signaled");
    assert_eq!(last["exit"]["signal"], 9);
    assert!(
        !h["history"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["unit"] == "run00"),
        "the stop was recorded as a crash: {h}"
    );
    let left = ns.json(&["status"])["units"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|u| u["state"] == "running")
        .count();
    assert_eq!(left, RUNNERS - 1);
}

// ---------------------------------------------------------------------------------------------
// Bugs found
// ---------------------------------------------------------------------------------------------

/// Regression: the caller's identity is the owner of the reply FIFO, so another user must not be
/// able to name a root client's waiting FIFO. The reply dir is 1733 (not listable) and taucli's
/// FIFO names carry 128 random bits: a `control_group` member cannot find one to borrow.
#[test]
fn group_member_cannot_list_reply_fifos_to_borrow_them() {
    let _g = ns_test_guard!("group_member_cannot_list_reply_fifos_to_borrow_them");
    let Some(group) = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(65534))
        .ok()
        .flatten()
    else {
        eprintln!("SKIP group_member_cannot_list_reply_fifos_to_borrow_them: no group 65534");
        return;
    };
    let dir = TestDir::new("spoof");
    dir.config(&format!("control_group = \"{}\"", group.name));
    dir.unit("svc", SLEEPER);
    let ns = Ns::start(&dir);
    ns.wait_running("svc");
    let mode = fs::metadata(dir.reply_dir()).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o1733, "reply dir mode {mode:o}");
    // A root client waiting for its reply, named as taucli names it.
    let victim = dir
        .reply_dir()
        .join(tau_init::control::client::reply_name().unwrap());
    mkfifo(&victim, 0o600);
    let _vreader = open_read_nb(&victim);
    let listing = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            "/bin/ls",
        ])
        .arg(dir.reply_dir())
        .output()
        .unwrap();
    assert!(
        !listing.status.success(),
        "reply dir listable by others: {listing:?}"
    );
    assert!(
        !String::from_utf8_lossy(&listing.stdout).contains("taucli."),
        "{listing:?}"
    );
    // Other users can still create their own reply FIFOs there and be answered.
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_taucli"))
        .arg("--run-dir")
        .arg(dir.run())
        .args(["status", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let _ = fs::remove_file(&victim);
}

/// Regression: `taucli --run-dir DIR` with a relative DIR must send an absolute reply path
/// (tau-init refuses relative ones), not time out as unreachable.
#[test]
fn taucli_relative_run_dir_works() {
    let _g = ns_test_guard!("taucli_relative_run_dir_works");
    let dir = TestDir::new("relcli");
    dir.config("");
    dir.unit("svc", SLEEPER);
    let ns = Ns::start(&dir);
    ns.wait_running("svc");
    let mut c = Command::new(CLI);
    c.current_dir(&dir.path).env_remove("TAU_RUN_DIR").args([
        "--run-dir",
        "run",
        "status",
        "--json",
        "--timeout",
        "1500",
    ]);
    let o = run_cmd(c);
    assert_eq!(
        o.code,
        0,
        "`taucli --run-dir run status` (relative, tau-init running there) -> {o:?}{}",
        ns.ctx()
    );
    assert_eq!(o.json()["units"][0]["name"], "svc");
}

/// Regression: tau-init started with a relative `--run-dir` resolves it, so absolute reply paths
/// inside `<run-dir>/reply` are accepted and answered.
#[test]
fn tau_init_relative_run_dir_answers() {
    let _g = ns_test_guard!("tau_init_relative_run_dir_answers");
    let dir = TestDir::new("relinit");
    dir.config("");
    dir.unit("svc", SLEEPER);
    let ns = Ns::start_with(&dir, Path::new("run"), false);
    assert!(
        wait_until(Duration::from_secs(5), || dir
            .run()
            .join("control")
            .exists()),
        "no control FIFO{}",
        ns.ctx()
    );
    let o = taucli(&dir.run(), &["status", "--json", "--timeout", "1500"]);
    assert_eq!(
        o.code,
        0,
        "tau-init --run-dir run (relative) does not answer: {o:?}{}",
        ns.ctx()
    );
}

/// Regression: a request already written to the control FIFO when `reexec` execs must be
/// answered by the new instance (the FIFO is handed over open across exec, so the kernel keeps
/// what is queued). Deterministic: the control pipe is enlarged and the `status` request is
/// queued behind 300 KB of blank lines, past the 256 KB read budget, after `reexec`.
#[test]
fn requests_queued_at_reexec_are_answered() {
    let _g = ns_test_guard!("requests_queued_at_reexec_are_answered");
    let dir = TestDir::new("reexecq");
    dir.config("");
    dir.unit("svc", SLEEPER);
    let ns = Ns::start(&dir);
    ns.wait_running("svc");
    let r1 = dir.reply_dir().join("first");
    let r2 = dir.reply_dir().join("queued");
    mkfifo(&r1, 0o600);
    mkfifo(&r2, 0o600);
    let mut f1 = open_read_nb(&r1);
    let mut f2 = open_read_nb(&r2);
    let mut buf = request(&r1, "reexec", &[], json!({}));
    buf.extend(std::iter::repeat_n(b'\n', 300 * 1024));
    buf.extend(request(&r2, "status", &[], json!({})));
    let mut w = OpenOptions::new()
        .write(true)
        .open(dir.run().join("control"))
        .unwrap();
    nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20)).unwrap();
    w.write_all(&buf).unwrap();
    drop(w);
    ns.expect_log("resumed after re-exec", Duration::from_secs(5));
    let mut got1 = Vec::new();
    assert!(
        wait_until(Duration::from_secs(3), || {
            got1.extend(drain_now(&mut f1));
            got1.ends_with(b"\n")
        }),
        "no reply to reexec"
    );
    assert!(String::from_utf8_lossy(&got1).contains("\"reexec\":true"));
    let mut got2 = Vec::new();
    let answered = wait_until(Duration::from_secs(3), || {
        got2.extend(drain_now(&mut f2));
        got2.ends_with(b"\n")
    });
    assert!(ns.pid1_alive());
    assert!(
        answered,
        "a status request queued in the control FIFO when reexec ran was never answered{}",
        ns.ctx()
    );
}
