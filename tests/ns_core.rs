//! tau-init as PID 1 of a fresh PID namespace (`unshare --pid --fork --mount-proc`): orphan
//! reaping under a 10,000-zombie storm, every recovery strategy with its observed delays,
//! `max_attempts` and the durable crash history, session state across crashes and boots, the
//! ordered shutdown that empties the namespace, and `--validate`.
//!
//! The namespace tests need root and a working `unshare`; without them each one prints
//! `SKIP <test>: <reason>` and passes. They run one at a time (a process-wide lock) so that
//! their timing is not skewed by each other. Set `TAU_NS_KEEP=1` to keep the temp dirs.
//!
//! Fixtures for `--validate` are in `tests/fixtures/ns/validate/`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;

use common::TAU_INIT as BIN;
use common::{
    NsInit as Ns, Proc, TestDir, host_procs, log_tail, ns_test_guard, pid_ns_link,
    unshare_tau_init, uptime, wait_until,
};

// ---------------------------------------------------------------------------------------------
// Temp dirs, config and units
// ---------------------------------------------------------------------------------------------

/// A fresh directory per test (see `common::TestDir`): `tau.toml`, `units/`, `out/` (for
/// markers written by units), and the run/state/session dirs tau-init creates. Kept when the
/// test failed or `TAU_NS_KEEP` is set.
impl TestDir {
    fn new(name: &str) -> Self {
        let dir = TestDir::create("tau-ns", name, "TAU_NS_KEEP");
        fs::create_dir_all(dir.p("out")).unwrap();
        dir
    }

    fn out(&self, rel: &str) -> PathBuf {
        self.path.join("out").join(rel)
    }

    /// `<session_state_path>/<unit>`: the unit's `$TAU_STATE_DIR`.
    fn session(&self, unit: &str) -> PathBuf {
        self.path.join("session").join(unit)
    }

    /// Writes `tau.toml`, keeping tau-init away from every host resource.
    fn config(&self, log_level: &str, shutdown_kill_timeout_ms: u64) {
        let d = self.path.display();
        let text = format!(
            r#"[system]
units_dir = "{d}/units"
run_dir = "{d}/run"
state_dir = "{d}/state"
persistent_device = ""
cgroup_root = "{d}/nocgroup"
hostname = ""
log_level = "{log_level}"
shutdown_kill_timeout_ms = {shutdown_kill_timeout_ms}

[crash_recovery]
session_state_path = "{d}/session"
"#
        );
        fs::write(self.p("tau.toml"), text).unwrap();
    }

    /// Writes `units/<name>.toml`; `@OUT@` in `body` becomes the `out/` dir.
    fn unit(&self, name: &str, body: &str) {
        let body = body.replace("@OUT@", &self.path.join("out").display().to_string());
        fs::write(self.p(&format!("units/{name}.toml")), body).unwrap();
    }

    fn state_json(&self) -> Option<serde_json::Value> {
        let text = fs::read_to_string(self.p("state/tau-init.state.json")).ok()?;
        serde_json::from_str(&text).ok()
    }
}

// ---------------------------------------------------------------------------------------------
// Timestamps
// ---------------------------------------------------------------------------------------------

/// Numbers, one per line (timestamps units appended from `/proc/uptime`).
fn read_floats(path: &Path) -> Vec<f64> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

/// Gaps between consecutive timestamps, in ms.
fn gaps_ms(ts: &[f64]) -> Vec<i64> {
    ts.windows(2)
        .map(|w| ((w[1] - w[0]) * 1000.0).round() as i64)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// tau-init in a PID namespace
// ---------------------------------------------------------------------------------------------

/// The log for failure messages (per-orphan debug lines left out, at most 300 lines).
fn ctx_without_orphans(log: &str) -> String {
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| !l.contains("reaped orphan"))
        .collect();
    log_tail(&lines, 300)
}

/// `common::NsInit` (tau-init under unshare; dropping it kills the namespace), plus what the
/// tests of this file look at: members, zombies, leftovers and a clean SIGTERM shutdown.
impl Ns {
    /// Starts tau-init on `dir` and waits until it has begun starting units.
    fn start(dir: &TestDir) -> Ns {
        Ns::spawn(unshare_tau_init(dir, &dir.p("run")), ctx_without_orphans)
    }

    /// Host view of the namespace: PID 1 and all its descendants (orphans are its children),
    /// plus anything else whose pid namespace is ours.
    fn members(&self) -> Vec<Proc> {
        let all = host_procs();
        let mut inside = vec![self.pid1];
        let mut i = 0;
        while i < inside.len() {
            let parent = inside[i];
            inside.extend(all.iter().filter(|p| p.ppid == parent).map(|p| p.pid));
            i += 1;
        }
        all.into_iter()
            .filter(|p| {
                inside.contains(&p.pid)
                    || pid_ns_link(p.pid).as_deref() == Some(self.ns_link.as_str())
            })
            .collect()
    }

    fn zombies(&self) -> Vec<Proc> {
        self.members()
            .into_iter()
            .filter(|p| p.state == 'Z')
            .collect()
    }

    /// Every process whose pid namespace is ours (zombies included when their link is readable).
    fn ns_leftovers(&self) -> Vec<Proc> {
        assert!(
            self.ns_file.is_some(),
            "the namespace file was not held open"
        );
        host_procs()
            .into_iter()
            .filter(|p| pid_ns_link(p.pid).as_deref() == Some(self.ns_link.as_str()))
            .collect()
    }

    /// SIGTERM to PID 1; asserts a complete shutdown and that nothing of the namespace remains.
    ///
    /// tau-init reaches `shutdown: poweroff` either when waitpid says ECHILD (no process left
    /// but itself) or, after logging `still alive after SIGKILL`, at a deadline: the first
    /// without the second proves the namespace was empty before reboot(2). After that the
    /// kernel kills PID 1 (SIGINT, so unshare reports that signal) and nothing may remain.
    fn shutdown_clean(&mut self) {
        self.signal(Signal::SIGTERM);
        let status = self.wait_exit(Duration::from_secs(30));
        assert!(
            status.is_some(),
            "tau-init did not go down within 30 s of SIGTERM{}",
            self.ctx()
        );
        self.join_reader();
        let log = self.log();
        assert!(
            log.contains("shutdown: all units stopped"),
            "no `all units stopped`{}",
            self.ctx()
        );
        assert!(
            log.contains("shutdown: poweroff"),
            "shutdown did not reach reboot(2){}",
            self.ctx()
        );
        assert!(
            !log.contains("still alive after SIGKILL"),
            "processes survived SIGKILL{}",
            self.ctx()
        );
        let left = self.ns_leftovers();
        assert!(
            left.is_empty(),
            "processes of the namespace left after shutdown: {left:?}{}",
            self.ctx()
        );
    }
}

/// Lines of the log with their monotonic timestamp (`[  603.841] tau-init: ...`).
fn log_lines(log: &str) -> Vec<(f64, &str)> {
    log.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix('[')?;
            let end = rest.find(']')?;
            let t: f64 = rest[..end].trim().parse().ok()?;
            Some((t, &rest[end + 1..]))
        })
        .collect()
}

/// Index and time of the first log line containing `pat`.
fn find_line(lines: &[(f64, &str)], pat: &str) -> Option<(usize, f64)> {
    lines
        .iter()
        .position(|(_, l)| l.contains(pat))
        .map(|i| (i, lines[i].0))
}

fn count(log: &str, pat: &str) -> usize {
    log.lines().filter(|l| l.contains(pat)).count()
}

/// A unit that appends `/proc/uptime` to `$TAU_STATE_DIR/starts` and exits `code` at once.
fn crasher(code: i32, recovery: &str) -> String {
    format!(
        r#"exec = ["/bin/sh", "-c", 'read t _ < /proc/uptime; echo "$t" >> "$TAU_STATE_DIR/starts"; exit {code}']

[recovery]
{recovery}
"#
    )
}

// ---------------------------------------------------------------------------------------------
// 1. Zombie storm
// ---------------------------------------------------------------------------------------------

const STORM: usize = 10_000;
const TICK_MS: i64 = 200;
/// Most a ticker restart may be late during the storm. A loop that reaped the storm in one go,
/// or let the reap backlog starve its timers, would be seconds late.
const STORM_LATE_MS: i64 = 800;
/// Most a restart may come later than its policy says (restart strategies test).
const SLACK_MS: i64 = 300;

/// 10,000 orphans are handed to PID 1 in 20 bursts of 500 (each from a parent that exits
/// without reaping its children); every one is reaped by PID 1, none is left as a zombie, and
/// a unit restarting every 200 ms keeps its rhythm throughout.
#[test]
fn zombie_storm_10000_orphans_all_reaped_and_loop_stays_responsive() {
    let _g = ns_test_guard!("zombie_storm");
    if !Command::new("perl")
        .args(["-MPOSIX", "-e", "1"])
        .status()
        .is_ok_and(|s| s.success())
    {
        eprintln!("SKIP zombie_storm: perl (with POSIX) is needed to fork the storm");
        return;
    }
    let dir = TestDir::new("storm");
    dir.config("debug", 1000);
    // dash reaps its own background jobs, so the storm comes from perl: each of 20 short-lived
    // parents forks 500 children and exits without reaping them; half the children are already
    // zombies when handed to PID 1, half still run for 50 ms (live orphans).
    dir.unit(
        "storm",
        &format!(
            r#"exec = ["/bin/sh", "-c", '''
read t _ < /proc/uptime; echo "$t" > @OUT@/storm-begin
perl -MPOSIX -e '
  for my $j (1 .. 20) {{
    my $p = fork;
    defined $p or die "fork: $!";
    if (!$p) {{
      for my $i (1 .. {per}) {{
        my $c = fork;
        defined $c or POSIX::_exit(1);
        if (!$c) {{ select(undef, undef, undef, 0.05) if $i % 2; POSIX::_exit(0) }}
      }}
      POSIX::_exit(0);
    }}
    waitpid($p, 0);
    $? == 0 or die "storm parent failed: $?";
  }}' || exit 1
read t _ < /proc/uptime; echo "$t" > @OUT@/storm-end
exec sleep 1000
''']

[recovery]
strategy = "notify_admin"
"#,
            per = STORM / 20
        ),
    );
    dir.unit(
        "ticker",
        &crasher(1, &format!("strategy = \"restart_with_delay\"\ndelay_ms = {TICK_MS}\nmax_attempts = 100000\nreset_after_ms = 3600000")),
    );
    let mut ns = Ns::start(&dir);
    let t_start = Instant::now();
    ns.expect_log("storm: started", Duration::from_secs(10));
    let ended = wait_until(Duration::from_secs(40), || dir.out("storm-end").exists());
    assert!(ended, "the storm unit did not finish forking{}", ns.ctx());
    let fork_time = t_start.elapsed();
    // Every orphan reaped: no zombie left in the namespace.
    let mut last = Vec::new();
    let clean = wait_until(Duration::from_secs(20), || {
        last = ns.zombies();
        last.is_empty()
    });
    let t_clean = uptime();
    assert!(
        clean,
        "{} zombies left in the namespace, e.g. {:?}{}",
        last.len(),
        &last[..last.len().min(5)],
        ns.ctx()
    );
    // Let the ticker show at least one more beat after the storm.
    thread::sleep(Duration::from_millis(3 * TICK_MS as u64));
    let log = ns.log();
    let reaped = count(&log, "reaped orphan");
    assert!(
        reaped >= STORM,
        "only {reaped} orphans reaped by PID 1 (expected {STORM}){}",
        ns.ctx()
    );
    let members = ns.members();
    assert!(
        members.len() <= 4,
        "unexpected processes in the namespace: {members:?}{}",
        ns.ctx()
    );

    // The loop kept its timers during the storm.
    let t0 = read_floats(&dir.out("storm-begin"))[0];
    let ticks = read_floats(&dir.session("ticker").join("starts"));
    let gaps = gaps_ms(&ticks);
    let during: Vec<(f64, i64)> = ticks
        .windows(2)
        .zip(&gaps)
        .filter(|(w, _)| w[1] >= t0 && w[0] <= t_clean)
        .map(|(w, &g)| (w[0], g))
        .collect();
    let storm_secs = t_clean - t0;
    let mut sorted: Vec<i64> = during.iter().map(|d| d.1).collect();
    sorted.sort_unstable();
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0);
    eprintln!(
        "storm: {STORM} orphans, forked in {fork_time:?}, clean {storm_secs:.2} s after start, {reaped} reaped; \
         {} ticker gaps during the storm, median {median} ms, max {} ms",
        during.len(),
        sorted.last().copied().unwrap_or(0)
    );
    assert!(
        median <= TICK_MS + 200,
        "ticker lost its rhythm during the storm: median gap {median} ms: {during:?}{}",
        ns.ctx()
    );
    assert!(
        during.len() as f64
            >= (storm_secs * 1000.0 / (TICK_MS + STORM_LATE_MS) as f64)
                .floor()
                .max(2.0),
        "too few ticker restarts during a {storm_secs:.2} s storm: {during:?}{}",
        ns.ctx()
    );
    for &(at, g) in &during {
        assert!(
            (TICK_MS - 20..=TICK_MS + STORM_LATE_MS).contains(&g),
            "ticker restart at {at:.2} came {g} ms after the previous one (delay {TICK_MS} ms) during the storm: {during:?}{}",
            ns.ctx()
        );
    }
    ns.shutdown_clean();
}

// ---------------------------------------------------------------------------------------------
// 2. Restart strategies
// ---------------------------------------------------------------------------------------------

/// `restart`, `restart_with_delay` and `restart_with_backoff`: spawn gaps observed by the units
/// themselves match the policy, and the log announces the same delays.
#[test]
fn restart_strategies_observe_their_delays() {
    let _g = ns_test_guard!("restart_strategies");
    let dir = TestDir::new("strategies");
    dir.config("info", 1000);
    dir.unit(
        "now",
        &crasher(1, "strategy = \"restart\"\nmax_attempts = 3"),
    );
    dir.unit(
        "delayed",
        &crasher(
            1,
            "strategy = \"restart_with_delay\"\ndelay_ms = 500\nmax_attempts = 3",
        ),
    );
    dir.unit(
        "backoff",
        &crasher(
            1,
            "strategy = \"restart_with_backoff\"\nbackoff_initial_ms = 200\nbackoff_factor = 2.0\nbackoff_max_ms = 700\nmax_attempts = 4",
        ),
    );
    let mut ns = Ns::start(&dir);
    for (unit, n) in [("now", 4), ("delayed", 4), ("backoff", 5)] {
        ns.expect_log(
            &format!("ALERT: {unit}: crashed {n} times (exit:1), giving up"),
            Duration::from_secs(15),
        );
    }
    let log = ns.log();
    // (unit, expected delays in ms)
    let cases: [(&str, &[i64]); 3] = [
        ("now", &[0, 0, 0]),
        ("delayed", &[500, 500, 500]),
        ("backoff", &[200, 400, 700, 700]),
    ];
    let mut report = Vec::new();
    for (unit, expected) in cases {
        let starts = read_floats(&dir.session(unit).join("starts"));
        let gaps = gaps_ms(&starts);
        report.push(format!("{unit}: {gaps:?}"));
        assert_eq!(
            gaps.len(),
            expected.len(),
            "{unit}: {} starts, expected {}{}",
            starts.len(),
            expected.len() + 1,
            ns.ctx()
        );
        for (k, (&g, &want)) in gaps.iter().zip(expected).enumerate() {
            // Never early; late by at most SLACK_MS (fork/exec and scheduling on a loaded machine).
            let ok = if want == 0 {
                g < SLACK_MS
            } else {
                (want - 20..=want + SLACK_MS).contains(&g)
            };
            assert!(
                ok,
                "{unit}: restart {} came after {g} ms, expected {want} ms (gaps {gaps:?}){}",
                k + 1,
                ns.ctx()
            );
            let attempt = k + 1;
            let announced = if want == 0 {
                format!(
                    "{unit}: crashed (exit:1), restarting (attempt {attempt}/{})",
                    expected.len()
                )
            } else {
                format!(
                    "{unit}: crashed (exit:1), restarting in {want} ms (attempt {attempt}/{})",
                    expected.len()
                )
            };
            assert!(
                log.contains(&announced),
                "missing `{announced}`{}",
                ns.ctx()
            );
        }
    }
    eprintln!("observed restart gaps (ms): {}", report.join("; "));
    ns.shutdown_clean();
}

/// `notify_admin` alerts and leaves the unit failed after one start; `fallback_to_safe_mode`
/// switches the system to safe mode: units not allowed there are stopped, safe-mode-only units
/// start, units allowed in both modes are left alone.
#[test]
fn notify_admin_and_fallback_to_safe_mode() {
    let _g = ns_test_guard!("notify_admin_and_fallback_to_safe_mode");
    let dir = TestDir::new("safemode");
    dir.config("info", 1000);
    dir.unit("notify", &crasher(4, "strategy = \"notify_admin\""));
    dir.unit(
        "fallback",
        r#"exec = ["/bin/sh", "-c", 'read t _ < /proc/uptime; echo "$t" >> "$TAU_STATE_DIR/starts"; sleep 0.5; exit 6']

[recovery]
strategy = "fallback_to_safe_mode"
"#,
    );
    let looping = |name: &str, extra: &str| {
        format!(
            r#"exec = ["/bin/sh", "-c", 'read t _ < /proc/uptime; echo "$t" >> "$TAU_STATE_DIR/starts"; trap "echo {name}-term >> @OUT@/terms; exit 0" TERM; while :; do sleep 0.1; done']
{extra}
"#
        )
    };
    dir.unit("bystander", &looping("bystander", ""));
    dir.unit("keeper", &looping("keeper", "safe_mode = true"));
    dir.unit("rescue", &looping("rescue", "safe_mode_only = true"));
    let mut ns = Ns::start(&dir);
    ns.expect_log(
        "ALERT: notify: crashed (exit:4); needs an admin",
        Duration::from_secs(10),
    );
    ns.expect_log(
        "ALERT: entering safe mode: unit fallback crashed (exit:6): fallback_to_safe_mode",
        Duration::from_secs(10),
    );
    ns.expect_log("rescue: started", Duration::from_secs(10));
    ns.expect_log("bystander: stopped", Duration::from_secs(10));
    thread::sleep(Duration::from_millis(1000));
    let log = ns.log();
    let lines = log_lines(&log);
    let starts = |u: &str| read_floats(&dir.session(u).join("starts")).len();
    assert_eq!(
        starts("notify"),
        1,
        "notify_admin must not restart{}",
        ns.ctx()
    );
    assert_eq!(
        starts("fallback"),
        1,
        "fallback_to_safe_mode must not restart{}",
        ns.ctx()
    );
    assert_eq!(starts("bystander"), 1, "bystander{}", ns.ctx());
    assert_eq!(
        starts("keeper"),
        1,
        "a safe_mode unit keeps running across the switch{}",
        ns.ctx()
    );
    assert_eq!(starts("rescue"), 1, "rescue{}", ns.ctx());
    let (safe_at, _) = find_line(&lines, "ALERT: entering safe mode").unwrap();
    let (rescue_at, _) = find_line(&lines, "rescue: started").unwrap();
    assert!(
        rescue_at > safe_at,
        "safe_mode_only unit started before safe mode{}",
        ns.ctx()
    );
    assert!(
        !log.contains("keeper: stopping"),
        "keeper (safe_mode = true) was stopped{}",
        ns.ctx()
    );
    assert_eq!(
        fs::read_to_string(dir.out("terms")).unwrap_or_default(),
        "bystander-term\n",
        "{}",
        ns.ctx()
    );
    let state = dir.state_json().expect("state file");
    let actions: Vec<(String, String)> = state["crashes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["unit"].as_str().unwrap().to_string(),
                c["action"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        actions.contains(&("notify".into(), "notify_admin".into())),
        "{actions:?}"
    );
    assert!(
        actions.contains(&("fallback".into(), "safe_mode".into())),
        "{actions:?}"
    );
    ns.shutdown_clean();
}

// ---------------------------------------------------------------------------------------------
// 3. max_attempts and the durable crash history
// ---------------------------------------------------------------------------------------------

#[test]
fn max_attempts_is_honoured_and_crashes_are_recorded() {
    let _g = ns_test_guard!("max_attempts");
    let dir = TestDir::new("maxattempts");
    dir.config("info", 1000);
    dir.unit(
        "flaky",
        &crasher(
            5,
            "strategy = \"restart_with_delay\"\ndelay_ms = 100\nmax_attempts = 2",
        ),
    );
    let mut ns = Ns::start(&dir);
    ns.expect_log(
        "ALERT: flaky: crashed 3 times (exit:5), giving up",
        Duration::from_secs(10),
    );
    let starts_path = dir.session("flaky").join("starts");
    assert_eq!(
        read_floats(&starts_path).len(),
        3,
        "max_attempts = 2 means 3 starts{}",
        ns.ctx()
    );
    thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        read_floats(&starts_path).len(),
        3,
        "started again after giving up{}",
        ns.ctx()
    );
    let log = ns.log();
    assert_eq!(count(&log, "flaky: started, pid"), 3, "{}", ns.ctx());
    let lines = log_lines(&log);
    let (alert_at, _) = find_line(&lines, "ALERT: flaky").unwrap();
    assert!(
        !lines[alert_at..]
            .iter()
            .any(|(_, l)| l.contains("flaky: started")),
        "started after the ALERT{}",
        ns.ctx()
    );

    let mut state = None;
    let saved = wait_until(Duration::from_secs(5), || {
        state = dir.state_json();
        state
            .as_ref()
            .and_then(|s| s["crashes"].as_array())
            .is_some_and(|c| c.len() >= 3)
    });
    assert!(
        saved,
        "state file lacks the crash records: {state:?}{}",
        ns.ctx()
    );
    let state = state.unwrap();
    let crashes = state["crashes"].as_array().unwrap();
    assert_eq!(crashes.len(), 3, "{state:#}");
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    for (k, (c, action)) in crashes
        .iter()
        .zip(["restart_in:100", "restart_in:100", "gave_up"])
        .enumerate()
    {
        assert_eq!(c["unit"], "flaky", "{c}");
        assert_eq!(c["attempt"], k as u64 + 1, "{c}");
        assert_eq!(c["action"], action, "{c}");
        assert_eq!(c["exit"]["kind"], "exited", "{c}");
        assert_eq!(c["exit"]["code"], 5, "{c}");
        assert_eq!(c["core_dumped"], false, "{c}");
        assert!(c["uptime_ms"].as_u64().is_some_and(|u| u < 5000), "{c}");
        let t = c["time_ms"].as_u64().unwrap();
        assert!(
            t <= now_ms && now_ms - t < 60_000,
            "time_ms {t} is not a recent wall-clock time: {c}"
        );
    }
    ns.shutdown_clean();
    // After shutdown the history is still on disk (saved again at power-off).
    let after = dir.state_json().expect("state file after shutdown");
    let n = after["crashes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["unit"] == "flaky")
        .count();
    assert_eq!(n, 3, "{after:#}");
}

// ---------------------------------------------------------------------------------------------
// 4. Session state
// ---------------------------------------------------------------------------------------------

/// `$TAU_STATE_DIR` keeps its contents across a crash and across a new boot, is 0700, and the
/// restarted instance sees `TAU_RESTART_COUNT=1` and `TAU_LAST_EXIT=exit:7`.
#[test]
fn session_state_survives_crash_and_reboot() {
    let _g = ns_test_guard!("session_state");
    let dir = TestDir::new("session");
    dir.config("info", 1000);
    dir.unit(
        "keeper",
        r#"exec = ["/bin/sh", "-c", '''
d="$TAU_STATE_DIR"
if [ ! -e "$d/data" ]; then
  echo "unit=$TAU_UNIT count=$TAU_RESTART_COUNT last=$TAU_LAST_EXIT" > "$d/first"
  echo payload-42 > "$d/data"
  exit 7
fi
echo "unit=$TAU_UNIT count=$TAU_RESTART_COUNT last=$TAU_LAST_EXIT data=$(cat "$d/data") mode=$(stat -c %a "$d")" > "$d/result.tmp"
mv "$d/result.tmp" "$d/result"
exec sleep 1000
''']

[recovery]
strategy = "restart"
max_attempts = 3
"#,
    );
    let sdir = dir.session("keeper");
    let mut ns = Ns::start(&dir);
    let ok = wait_until(Duration::from_secs(10), || sdir.join("result").exists());
    assert!(ok, "the restarted unit wrote no result{}", ns.ctx());
    let first = fs::read_to_string(sdir.join("first")).unwrap();
    assert_eq!(
        first.trim(),
        "unit=keeper count=0 last=none",
        "{}",
        ns.ctx()
    );
    let result = fs::read_to_string(sdir.join("result")).unwrap();
    assert_eq!(
        result.trim(),
        "unit=keeper count=1 last=exit:7 data=payload-42 mode=700",
        "{}",
        ns.ctx()
    );
    let mode = fs::metadata(&sdir).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o700, "session state dir mode {mode:o}");
    assert_eq!(count(&ns.log(), "keeper: started, pid"), 2, "{}", ns.ctx());
    ns.shutdown_clean();
    drop(ns);

    // A new boot: the directory and its contents are still there, and the mode is restored.
    fs::set_permissions(&sdir, fs::Permissions::from_mode(0o755)).unwrap();
    fs::remove_file(sdir.join("result")).unwrap();
    let mut ns = Ns::start(&dir);
    let ok = wait_until(Duration::from_secs(10), || sdir.join("result").exists());
    assert!(ok, "no result on the second boot{}", ns.ctx());
    let result = fs::read_to_string(sdir.join("result")).unwrap();
    assert!(
        result.contains("data=payload-42 mode=700"),
        "second boot: {result}{}",
        ns.ctx()
    );
    assert_eq!(
        fs::read_to_string(sdir.join("first")).unwrap(),
        first,
        "first-run marker rewritten"
    );
    assert_eq!(
        count(&ns.log(), "keeper: started, pid"),
        1,
        "the unit crashed on the second boot{}",
        ns.ctx()
    );
    assert!(
        ns.log().contains("restored state: 1 crash records"),
        "durable state not restored{}",
        ns.ctx()
    );
    ns.shutdown_clean();
}

// ---------------------------------------------------------------------------------------------
// 5. Ordered shutdown
// ---------------------------------------------------------------------------------------------

/// SIGTERM to PID 1: units stop one after another (dependents before what they depend on,
/// less important before more important), a unit ignoring SIGTERM is SIGKILLed after its
/// stop_timeout_ms, then strays get SIGTERM (and SIGKILL if they ignore it), and the namespace
/// ends up empty.
#[test]
fn sigterm_stops_units_in_order_and_empties_the_namespace() {
    let _g = ns_test_guard!("ordered_shutdown");
    let dir = TestDir::new("shutdown");
    dir.config("info", 700);
    let svc = |name: &str, extra: &str| {
        format!(
            r#"exec = ["/bin/sh", "-c", '''
trap 'read t _ < /proc/uptime; echo "{name} $t" >> @OUT@/stops; exit 0' TERM
echo $$ > @OUT@/{name}.pid
while :; do sleep 0.1; done
''']
{extra}
"#
        )
    };
    dir.unit("core", &svc("core", "priority = \"critical\""));
    dir.unit("db", &svc("db", "priority = \"high\""));
    dir.unit("app", &svc("app", "requires = [\"db\"]\nafter = [\"db\"]"));
    dir.unit("bg", &svc("bg", "priority = \"background\""));
    dir.unit(
        "web",
        r#"exec = ["/bin/sh", "-c", '''
setsid sh -c 'trap "echo stray-term >> @OUT@/stops; exit 0" TERM; echo $$ > @OUT@/stray.pid; while :; do sleep 0.1; done' &
setsid sh -c 'trap "" TERM; echo $$ > @OUT@/stubborn-stray.pid; while :; do sleep 0.1; done' &
trap 'read t _ < /proc/uptime; echo "web $t" >> @OUT@/stops; exit 0' TERM
echo $$ > @OUT@/web.pid
while :; do sleep 0.1; done
''']
after = ["app"]
"#,
    );
    // Catches SIGTERM but does not exit: must be SIGKILLed after stop_timeout_ms.
    dir.unit(
        "stubborn",
        r#"exec = ["/bin/sh", "-c", '''
trap 'echo stubborn-term >> @OUT@/stops' TERM
echo $$ > @OUT@/stubborn.pid
while :; do sleep 0.1; done
''']
priority = "low"
stop_timeout_ms = 500
"#,
    );
    let mut ns = Ns::start(&dir);
    let pids = [
        "core",
        "db",
        "app",
        "bg",
        "web",
        "stubborn",
        "stray",
        "stubborn-stray",
    ];
    let ready = wait_until(Duration::from_secs(10), || {
        pids.iter().all(|p| dir.out(&format!("{p}.pid")).exists())
    });
    assert!(ready, "not every unit and stray came up{}", ns.ctx());
    let before = ns.members();
    let comms = before.iter().filter(|p| p.comm == "sh").count();
    assert!(
        comms >= 8,
        "expected 6 unit shells and 2 strays, saw {before:?}{}",
        ns.ctx()
    );

    ns.shutdown_clean();
    let log = ns.log();
    let lines = log_lines(&log);
    let order = ["bg", "stubborn", "web", "app", "db", "core"];
    for w in order.windows(2) {
        let (stopped, _) = find_line(&lines, &format!("{}: stopped (", w[0]))
            .unwrap_or_else(|| panic!("{} never stopped{}", w[0], ns.ctx()));
        let (stopping, _) = find_line(&lines, &format!("{}: stopping (signal", w[1]))
            .unwrap_or_else(|| panic!("{} was never stopped{}", w[1], ns.ctx()));
        assert!(
            stopped < stopping,
            "{} was stopped before {} was down{}",
            w[1],
            w[0],
            ns.ctx()
        );
    }
    let (_, t_stop) = find_line(&lines, "stubborn: stopping (signal 15)").unwrap();
    let (_, t_kill) = find_line(&lines, "stubborn: did not stop in 500 ms, killing")
        .unwrap_or_else(|| panic!("stubborn was not SIGKILLed{}", ns.ctx()));
    let waited = ((t_kill - t_stop) * 1000.0).round() as i64;
    assert!(
        (480..=1000).contains(&waited),
        "stubborn killed {waited} ms after SIGTERM (stop_timeout_ms 500){}",
        ns.ctx()
    );
    assert!(log.contains("stubborn: stopped (signal:9)"), "{}", ns.ctx());
    let (all_down, _) = find_line(&lines, "shutdown: all units stopped").unwrap();
    let (term_all, _) = find_line(
        &lines,
        "shutdown: sending SIGTERM to all remaining processes",
    )
    .unwrap_or_else(|| panic!("no SIGTERM to remaining processes{}", ns.ctx()));
    let (kill_all, _) = find_line(
        &lines,
        "shutdown: sending SIGKILL to all remaining processes",
    )
    .unwrap_or_else(|| panic!("the stray ignoring SIGTERM was not SIGKILLed{}", ns.ctx()));
    assert!(all_down < term_all && term_all < kill_all, "{}", ns.ctx());

    // What the processes themselves saw, in order.
    let stops = fs::read_to_string(dir.out("stops")).unwrap_or_default();
    let seen: Vec<&str> = stops
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(
        seen,
        [
            "bg",
            "stubborn-term",
            "web",
            "app",
            "db",
            "core",
            "stray-term"
        ],
        "{stops}{}",
        ns.ctx()
    );
    let status = ns.status.unwrap();
    eprintln!("unshare exit status after a clean shutdown: {status:?}");
}

// ---------------------------------------------------------------------------------------------
// 6. --validate
// ---------------------------------------------------------------------------------------------

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/ns/validate")
        .join(rel)
}

/// Runs `tau-init --validate`; returns (exit code, stdout).
fn validate(config: &Path, units: &Path) -> (i32, String) {
    let out = Command::new(BIN)
        .arg("--validate")
        .arg("--config")
        .arg(config)
        .arg("--units")
        .arg(units)
        .stdin(Stdio::null())
        .output()
        .expect("run tau-init --validate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn validate_reports_every_problem_located() {
    let good_cfg = fixture("good/tau.toml");
    let good_units = fixture("good/units");
    let (code, out) = validate(&good_cfg, &good_units);
    assert_eq!(code, 0, "valid set rejected:\n{out}");
    assert!(out.starts_with("ok: ") && out.contains("2 units"), "{out}");

    // (config, units dir, expected problems as (file, "line:col", key substrings))
    type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str, Vec<&'a str>)>);
    let cases: Vec<Case> = vec![
        (
            "config-unknown-key.toml",
            "good/units",
            vec![(
                "config-unknown-key.toml",
                "3:1",
                vec!["unknown key `frobnicate`"],
            )],
        ),
        (
            "config-wrong-type.toml",
            "good/units",
            vec![(
                "config-wrong-type.toml",
                "3:28",
                vec![
                    "`shutdown_kill_timeout_ms`",
                    "invalid type",
                    "expected a non-negative integer",
                ],
            )],
        ),
        (
            "good/tau.toml",
            "units-unknown-key",
            vec![(
                "units-unknown-key/svc.toml",
                "2:1",
                vec!["unknown key `restart_policy`"],
            )],
        ),
        (
            "good/tau.toml",
            "units-missing-exec",
            vec![(
                "units-missing-exec/svc.toml",
                "1:1",
                vec!["`exec` must not be empty"],
            )],
        ),
        (
            "good/tau.toml",
            "units-relative-exec",
            vec![(
                "units-relative-exec/svc.toml",
                "2:1",
                vec!["`exec[0]` must be an absolute path", "`sh`"],
            )],
        ),
        (
            "good/tau.toml",
            "units-not-executable",
            vec![(
                "units-not-executable/svc.toml",
                "2:1",
                vec!["`/etc/passwd` is not executable"],
            )],
        ),
        (
            "good/tau.toml",
            "units-unknown-dep",
            vec![(
                "units-unknown-dep/svc.toml",
                "2:1",
                vec!["`after`: unknown unit `nosuch`"],
            )],
        ),
        (
            "good/tau.toml",
            "units-cycle",
            vec![
                (
                    "units-cycle/a.toml",
                    "2:1",
                    vec!["dependency cycle: a -> b -> a"],
                ),
                (
                    "units-cycle/b.toml",
                    "2:1",
                    vec!["dependency cycle: b -> a -> b"],
                ),
            ],
        ),
        (
            "good/tau.toml",
            "units-bad-strategy",
            vec![(
                "units-bad-strategy/svc.toml",
                "4:12",
                vec![
                    "`strategy`",
                    "unknown value `sometimes`",
                    "restart_with_backoff",
                ],
            )],
        ),
    ];
    for (cfg, units, expected) in cases {
        let (code, out) = validate(&fixture(cfg), &fixture(units));
        assert_eq!(code, 1, "{cfg} + {units}: exit {code}\n{out}");
        let problems: Vec<&str> = out
            .lines()
            .filter(|l| !l.ends_with("problem(s) found"))
            .collect();
        assert_eq!(problems.len(), expected.len(), "{cfg} + {units}:\n{out}");
        assert!(
            out.contains(&format!("{} problem(s) found", expected.len())),
            "{out}"
        );
        for (file, at, words) in expected {
            let prefix = format!("{}:{at}: ", fixture(file).display());
            let line = problems
                .iter()
                .find(|l| l.starts_with(&prefix))
                .unwrap_or_else(|| {
                    panic!("{cfg} + {units}: no line starting with `{prefix}`:\n{out}")
                });
            for w in words {
                assert!(
                    line.contains(w),
                    "{cfg} + {units}: `{w}` missing from `{line}`"
                );
            }
        }
    }

    // A missing config named explicitly is a problem too.
    let (code, out) = validate(&fixture("does-not-exist.toml"), &good_units);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("does-not-exist.toml:1:1: config file not found"),
        "{out}"
    );
}

#[test]
fn bad_usage_and_not_pid1_exit_2() {
    let out = Command::new(BIN)
        .arg("--no-such-flag")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "unknown flag: {out:?}");
    let out = Command::new(BIN)
        .arg("--config")
        .arg(fixture("good/tau.toml"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "not PID 1 without --foreground: {out:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not PID 1"),
        "{out:?}"
    );
}

/// A unit killed by a real-time signal (34) is a crash like any other: restarted, counted, and
/// given up on (nix's waitpid cannot name such signals; tau-init decodes the status itself).
#[test]
fn death_by_realtime_signal_is_a_crash() {
    let _g = ns_test_guard!("death_by_realtime_signal_is_a_crash");
    let dir = TestDir::new("rtsig");
    dir.config("info", 1000);
    dir.unit(
        "rt",
        r#"exec = ["/bin/sh", "-c", "sleep 0.1; kill -34 $$"]
[recovery]
strategy = "restart_with_delay"
delay_ms = 100
max_attempts = 2
"#,
    );
    let mut ns = Ns::start(&dir);
    ns.expect_log(
        "rt: crashed (signal:34), restarting in 100 ms (attempt 1/2)",
        Duration::from_secs(10),
    );
    ns.expect_log(
        "ALERT: rt: crashed 3 times (signal:34), giving up",
        Duration::from_secs(10),
    );
    ns.shutdown_clean();
}
