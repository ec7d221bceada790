//! State-machine tests: a fake event loop (clock, timers, pids) drives [`Supervisor`] the way
//! `runtime.rs` does — `Spawn` is answered at once with `Spawned` (or `SpawnFailed`), timers are
//! keyed by (unit, kind) and setting one again moves it.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;

use super::*;
use crate::config::model::{Ready, Recovery, Strategy};

const TERM: i32 = libc::SIGTERM;
const KILL: i32 = libc::SIGKILL;
const WALL0: u64 = 1_700_000_000_000;

// ---------------------------------------------------------------------------------------------
// Unit builder

struct B(Unit);

fn unit(name: &str) -> B {
    B(Unit {
        name: name.to_string(),
        path: PathBuf::from(format!("/etc/tau/units/{name}.toml")),
        description: String::new(),
        exec: vec!["/bin/true".to_string()],
        env: BTreeMap::new(),
        working_dir: None,
        uid: None,
        gid: None,
        priority: Priority::Normal,
        critical: false,
        after: Vec::new(),
        requires: Vec::new(),
        safe_mode: false,
        safe_mode_only: false,
        enabled: true,
        stop_signal: TERM,
        stop_timeout_ms: 1000,
        ready: Ready::None,
        ready_timeout_ms: 1000,
        console: false,
        memory_limit_mb: 0,
        cpu_limit_percent: 0.0,
        recovery: Recovery {
            strategy: Strategy::Restart,
            delay_ms: 1000,
            backoff_initial_ms: 100,
            backoff_max_ms: 1000,
            backoff_factor: 2.0,
            max_attempts: 3,
            reset_after_ms: 60_000,
        },
    })
}

impl B {
    fn priority(mut self, p: Priority) -> Self {
        self.0.priority = p;
        self
    }
    fn after(mut self, names: &[&str]) -> Self {
        self.0.after = names.iter().map(|s| s.to_string()).collect();
        self
    }
    fn requires(mut self, names: &[&str]) -> Self {
        self.0.requires = names.iter().map(|s| s.to_string()).collect();
        self
    }
    fn strategy(mut self, s: Strategy) -> Self {
        self.0.recovery.strategy = s;
        self
    }
    fn delay(mut self, ms: u64) -> Self {
        self.0.recovery.strategy = Strategy::RestartWithDelay;
        self.0.recovery.delay_ms = ms;
        self
    }
    fn backoff(mut self, initial: u64, factor: f64, max: u64) -> Self {
        let r = &mut self.0.recovery;
        r.strategy = Strategy::RestartWithBackoff;
        (r.backoff_initial_ms, r.backoff_factor, r.backoff_max_ms) = (initial, factor, max);
        self
    }
    fn max_attempts(mut self, n: u32) -> Self {
        self.0.recovery.max_attempts = n;
        self
    }
    fn reset_after(mut self, ms: u64) -> Self {
        self.0.recovery.reset_after_ms = ms;
        self
    }
    fn critical(mut self) -> Self {
        self.0.critical = true;
        self
    }
    fn safe_mode(mut self) -> Self {
        self.0.safe_mode = true;
        self
    }
    fn safe_mode_only(mut self) -> Self {
        self.0.safe_mode_only = true;
        self
    }
    fn disabled(mut self) -> Self {
        self.0.enabled = false;
        self
    }
    fn notify(mut self, ready_timeout_ms: u64) -> Self {
        self.0.ready = Ready::Notify;
        self.0.ready_timeout_ms = ready_timeout_ms;
        self
    }
    fn stop(mut self, signal: i32, timeout_ms: u64) -> Self {
        self.0.stop_signal = signal;
        self.0.stop_timeout_ms = timeout_ms;
        self
    }
}

// ---------------------------------------------------------------------------------------------
// Fake event loop

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Kill {
    unit: usize,
    signal: i32,
    at: Ms,
}

struct H {
    sup: Supervisor,
    clock: Ms,
    timers: BTreeMap<(usize, TimerKind), Ms>,
    next_pid: i32,
    /// (unit, time) of every Spawn action.
    spawns: Vec<(usize, Ms)>,
    kills: Vec<Kill>,
    alerts: Vec<String>,
    crash_log: Vec<CrashRecord>,
    units_down: usize,
    /// Spawns still to fail, per unit.
    fail_spawns: Vec<u32>,
}

fn h(units: Vec<B>) -> H {
    H::new(units, true, 100)
}

impl H {
    fn new(units: Vec<B>, auto_recovery: bool, max_running: usize) -> H {
        let units: Vec<Unit> = units.into_iter().map(|b| b.0).collect();
        let n = units.len();
        H {
            sup: Supervisor::new(units, auto_recovery, max_running),
            clock: 0,
            timers: BTreeMap::new(),
            next_pid: 100,
            spawns: Vec::new(),
            kills: Vec::new(),
            alerts: Vec::new(),
            crash_log: Vec::new(),
            units_down: 0,
            fail_spawns: vec![0; n],
        }
    }

    fn id(&self, name: &str) -> usize {
        self.sup
            .find(name)
            .unwrap_or_else(|| panic!("no unit {name}"))
    }

    fn now(&self) -> Now {
        Now {
            mono: self.clock,
            wall: WALL0 + self.clock,
        }
    }

    /// Dispatch like `Runtime::dispatch`: carry out actions in order, answering spawns at once.
    fn feed(&mut self, ev: Event) {
        let mut q: VecDeque<Action> = self.sup.handle(ev, self.now()).into();
        while let Some(a) = q.pop_front() {
            match a {
                Action::Spawn(i) => {
                    // Invariant: a unit is spawned only once its wanted dependencies run.
                    for &d in &self.sup.deps[i] {
                        let ds = &self.sup.states[d];
                        assert!(
                            !ds.wanted || ds.phase == Phase::Running,
                            "{} spawned while dependency {} is {:?}",
                            self.sup.units[i].name,
                            self.sup.units[d].name,
                            ds.phase
                        );
                    }
                    self.spawns.push((i, self.clock));
                    let ev = if self.fail_spawns[i] > 0 {
                        self.fail_spawns[i] -= 1;
                        Event::SpawnFailed {
                            unit: i,
                            errno: libc::ENOENT,
                            message: "exec: ENOENT".into(),
                        }
                    } else {
                        self.next_pid += 1;
                        Event::Spawned {
                            unit: i,
                            pid: self.next_pid,
                        }
                    };
                    q.extend(self.sup.handle(ev, self.now()));
                }
                Action::Kill { unit, pid, signal } => {
                    assert_eq!(self.sup.states[unit].pid, Some(pid), "kill of a stale pid");
                    self.kills.push(Kill {
                        unit,
                        signal,
                        at: self.clock,
                    });
                }
                Action::SetTimer { unit, kind, at } => {
                    assert!(at >= self.clock, "timer in the past");
                    self.timers.insert((unit, kind), at);
                }
                Action::CancelTimer { unit, kind } => {
                    self.timers.remove(&(unit, kind));
                }
                Action::Crash(rec) => self.crash_log.push(rec),
                Action::Alert(msg) => self.alerts.push(msg),
                Action::UnitsDown => self.units_down += 1,
                Action::Log(..) | Action::Persist => {}
            }
        }
    }

    fn boot(&mut self) {
        self.feed(Event::Boot { mode: Mode::Normal });
    }

    /// Move the clock to `t`, firing due timers in time order on the way.
    fn advance_to(&mut self, t: Ms) {
        assert!(t >= self.clock, "clock goes backwards");
        loop {
            let due = self
                .timers
                .iter()
                .filter(|&(_, &at)| at <= t)
                .min_by_key(|&(k, &at)| (at, *k));
            let Some((&(unit, kind), &at)) = due else {
                break;
            };
            self.timers.remove(&(unit, kind));
            self.clock = at;
            self.feed(Event::Timer { unit, kind });
        }
        self.clock = t;
    }

    /// Move the clock without firing anything (a timer not yet delivered).
    fn jump_to(&mut self, t: Ms) {
        assert!(t >= self.clock);
        self.clock = t;
    }

    fn crash(&mut self, name: &str, exit: ExitInfo) {
        let i = self.id(name);
        assert!(
            self.sup.states[i].pid.is_some(),
            "{name} has no process to exit"
        );
        self.feed(Event::Exited { unit: i, exit });
    }

    fn fail(&mut self, name: &str) {
        self.crash(name, ExitInfo::Exited { code: 1 });
    }

    /// The process ends after a signal was sent to it.
    fn exit(&mut self, name: &str) {
        self.crash(
            name,
            ExitInfo::Signaled {
                signal: TERM,
                core_dumped: false,
            },
        );
    }

    fn ready(&mut self, name: &str) {
        let i = self.id(name);
        self.feed(Event::Ready(i));
    }

    fn st(&self, name: &str) -> &UnitState {
        &self.sup.states[self.id(name)]
    }

    fn phase(&self, name: &str) -> Phase {
        self.st(name).phase
    }

    fn spawn_times(&self, name: &str) -> Vec<Ms> {
        let i = self.id(name);
        self.spawns
            .iter()
            .filter(|s| s.0 == i)
            .map(|s| s.1)
            .collect()
    }

    fn spawn_order(&self) -> Vec<&str> {
        self.spawns
            .iter()
            .map(|s| self.sup.units[s.0].name.as_str())
            .collect()
    }

    /// (signal, time) of kills sent to `name`.
    fn kills_of(&self, name: &str) -> Vec<(i32, Ms)> {
        let i = self.id(name);
        self.kills
            .iter()
            .filter(|k| k.unit == i)
            .map(|k| (k.signal, k.at))
            .collect()
    }

    fn killed_names(&self) -> Vec<&str> {
        self.kills
            .iter()
            .map(|k| self.sup.units[k.unit].name.as_str())
            .collect()
    }

    fn timer(&self, name: &str, kind: TimerKind) -> Option<Ms> {
        self.timers.get(&(self.id(name), kind)).copied()
    }

    fn actions(&self, name: &str) -> Vec<String> {
        self.crash_log
            .iter()
            .filter(|r| r.unit == name)
            .map(|r| r.action.clone())
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Strategy timing

#[test]
fn restart_respawns_at_once() {
    let mut h = h(vec![unit("a")]);
    h.boot();
    assert_eq!(h.spawn_times("a"), vec![0]);
    let pid1 = h.st("a").pid;
    h.advance_to(700);
    h.fail("a");
    assert_eq!(h.spawn_times("a"), vec![0, 700]);
    assert_eq!(h.phase("a"), Phase::Running);
    assert_ne!(h.st("a").pid, pid1);
    assert_eq!((h.st("a").attempts, h.st("a").restarts), (1, 1));
    assert_eq!(h.actions("a"), vec!["restart"]);
}

#[test]
fn restart_with_delay_respawns_exactly_delay_after_crash() {
    let mut h = h(vec![unit("a").delay(250)]);
    h.boot();
    h.advance_to(1000);
    h.fail("a");
    assert_eq!(h.phase("a"), Phase::Backoff);
    assert_eq!(h.st("a").restart_at, Some(1250));
    assert_eq!(h.timer("a", TimerKind::Restart), Some(1250));
    assert_eq!(h.actions("a"), vec!["restart_in:250"]);
    h.advance_to(1249);
    assert_eq!(h.spawn_times("a"), vec![0], "respawned early");
    assert_eq!(h.phase("a"), Phase::Backoff);
    h.advance_to(1250);
    assert_eq!(h.spawn_times("a"), vec![0, 1250]);
    assert_eq!(
        (h.phase("a"), h.st("a").restart_at, h.st("a").restarts),
        (Phase::Running, None, 1)
    );
}

#[test]
fn restart_with_backoff_grows_by_factor_and_caps() {
    let mut h = h(vec![unit("a").backoff(100, 3.0, 1000).max_attempts(6)]);
    h.boot();
    let mut expect_spawns = vec![0];
    for (n, delay) in [100u64, 300, 900, 1000, 1000, 1000].into_iter().enumerate() {
        let crash_at = h.clock + 10;
        h.advance_to(crash_at);
        h.fail("a");
        assert_eq!(h.st("a").attempts, n as u32 + 1);
        h.advance_to(crash_at + delay - 1);
        assert_eq!(
            h.spawn_times("a"),
            expect_spawns,
            "early respawn for attempt {}",
            n + 1
        );
        h.advance_to(crash_at + delay);
        expect_spawns.push(crash_at + delay);
        assert_eq!(h.spawn_times("a"), expect_spawns);
    }
    let acts = h.actions("a");
    assert_eq!(
        acts,
        [
            "restart_in:100",
            "restart_in:300",
            "restart_in:900",
            "restart_in:1000",
            "restart_in:1000",
            "restart_in:1000"
        ]
    );
    h.advance_to(h.clock + 10);
    h.fail("a");
    assert_eq!(h.phase("a"), Phase::Failed);
    assert_eq!(h.actions("a").last().map(String::as_str), Some("gave_up"));
}

// ---------------------------------------------------------------------------------------------
// Attempt counting

#[test]
fn max_attempts_three_means_four_spawns_then_failed() {
    let mut h = h(vec![unit("a").max_attempts(3), unit("b")]);
    h.boot();
    for k in 1..=4 {
        h.advance_to(k * 10);
        h.fail("a");
    }
    assert_eq!(h.spawn_times("a"), vec![0, 10, 20, 30]);
    assert_eq!(h.phase("a"), Phase::Failed);
    assert!(!h.st("a").wanted);
    assert_eq!(h.st("a").restarts, 3);
    let attempts: Vec<u32> = h.crash_log.iter().map(|r| r.attempt).collect();
    assert_eq!(attempts, vec![1, 2, 3, 4]);
    assert_eq!(h.actions("a"), ["restart", "restart", "restart", "gave_up"]);
    // Nothing else happens later.
    h.advance_to(1_000_000);
    assert_eq!(h.spawn_times("a").len(), 4);
}

#[test]
fn stable_timer_clears_attempts() {
    let mut h = h(vec![unit("a").reset_after(5000).max_attempts(3)]);
    h.boot();
    h.advance_to(10);
    h.fail("a");
    h.advance_to(20);
    h.fail("a");
    assert_eq!(h.st("a").attempts, 2);
    assert_eq!(h.timer("a", TimerKind::Stable), Some(5020));
    h.advance_to(5019);
    assert_eq!(h.st("a").attempts, 2);
    h.advance_to(5020);
    assert_eq!(
        h.st("a").attempts,
        0,
        "Stable timer did not clear the count"
    );
    h.advance_to(5030);
    h.fail("a");
    assert_eq!(h.crash_log.last().map(|r| r.attempt), Some(1));
    assert_eq!(h.phase("a"), Phase::Running);
}

#[test]
fn long_uptime_crash_resets_attempts_without_timer() {
    let mut h = h(vec![unit("a").reset_after(5000).max_attempts(3)]);
    h.boot();
    h.advance_to(10);
    h.fail("a");
    h.advance_to(20);
    h.fail("a");
    // Up 4999 ms: still counted.
    h.jump_to(20 + 4999);
    h.fail("a");
    assert_eq!(
        h.crash_log.last().map(|r| (r.attempt, r.uptime_ms)),
        Some((3, 4999))
    );
    // Up exactly reset_after_ms, the Stable timer not delivered yet: reset.
    let t = h.clock + 5000;
    h.jump_to(t);
    assert_eq!(
        h.timer("a", TimerKind::Stable),
        Some(t),
        "timer is pending, not fired"
    );
    h.fail("a");
    assert_eq!(
        h.crash_log.last().map(|r| (r.attempt, r.uptime_ms)),
        Some((1, 5000))
    );
    assert_eq!(h.phase("a"), Phase::Running);
}

#[test]
fn spawning_does_not_reset_attempts() {
    let mut h = h(vec![unit("a").delay(100).max_attempts(5)]);
    h.boot();
    h.advance_to(10);
    h.fail("a");
    h.advance_to(110);
    assert_eq!(h.spawn_times("a"), vec![0, 110]);
    assert_eq!(h.st("a").attempts, 1);
    h.advance_to(120);
    h.fail("a");
    assert_eq!(h.crash_log.last().map(|r| r.attempt), Some(2));
}

#[test]
fn spawn_failures_count_as_failures() {
    let mut h = h(vec![unit("a").max_attempts(2)]);
    h.fail_spawns[0] = 10;
    h.boot();
    assert_eq!(h.spawn_times("a"), vec![0, 0, 0]);
    assert_eq!(h.phase("a"), Phase::Failed);
    let errs: Vec<(ExitInfo, u32, u64)> = h
        .crash_log
        .iter()
        .map(|r| (r.exit, r.attempt, r.uptime_ms))
        .collect();
    let e = ExitInfo::SpawnFailed {
        errno: libc::ENOENT,
    };
    assert_eq!(errs, vec![(e, 1, 0), (e, 2, 0), (e, 3, 0)]);
}

#[test]
fn admin_restart_is_not_a_failure_and_clears_count() {
    let mut h = h(vec![unit("a").max_attempts(3)]);
    h.boot();
    h.advance_to(10);
    h.fail("a");
    h.advance_to(20);
    h.fail("a");
    assert_eq!(h.st("a").attempts, 2);
    h.advance_to(100);
    let a = h.id("a");
    h.feed(Event::Restart(a));
    assert_eq!(h.st("a").attempts, 0);
    assert_eq!(h.phase("a"), Phase::Stopping);
    assert_eq!(h.kills_of("a"), vec![(TERM, 100)]);
    h.advance_to(150);
    h.exit("a");
    assert_eq!(h.crash_log.len(), 2, "admin restart recorded as a crash");
    assert_eq!(h.spawn_times("a"), vec![0, 10, 20, 150]);
    assert_eq!(
        (h.phase("a"), h.st("a").attempts, h.st("a").restarts),
        (Phase::Running, 0, 2)
    );
    h.advance_to(160);
    h.fail("a");
    assert_eq!(h.crash_log.last().map(|r| r.attempt), Some(1));
}

#[test]
fn admin_restart_of_failed_unit_starts_it_afresh() {
    let mut h = h(vec![unit("a").max_attempts(0)]);
    h.boot();
    h.fail("a");
    assert_eq!(h.phase("a"), Phase::Failed);
    let a = h.id("a");
    h.advance_to(50);
    h.feed(Event::Restart(a));
    assert_eq!(h.spawn_times("a"), vec![0, 50]);
    assert_eq!(
        (h.phase("a"), h.st("a").attempts, h.st("a").reason.clone()),
        (Phase::Running, 0, None)
    );
}

// ---------------------------------------------------------------------------------------------
// Exhaustion and the non-restart strategies

#[test]
fn critical_exhaustion_enters_safe_mode() {
    let mut h = h(vec![
        unit("crit").critical().max_attempts(1),
        unit("svc").stop(libc::SIGINT, 700),
        unit("keep").safe_mode(),
        unit("shell").safe_mode_only(),
    ]);
    h.boot();
    assert_eq!(h.spawn_times("shell"), Vec::<Ms>::new());
    let keep_pid = h.st("keep").pid;
    h.advance_to(10);
    h.fail("crit");
    assert_eq!(h.sup.mode, Mode::Normal);
    h.advance_to(20);
    h.fail("crit");
    assert_eq!(h.sup.mode, Mode::Safe);
    assert_eq!(h.phase("crit"), Phase::Failed);
    assert_eq!(
        h.crash_log.last().map(|r| (r.attempt, r.action.as_str())),
        Some((2, "safe_mode"))
    );
    assert!(
        h.alerts.iter().any(|a| a.starts_with("entering safe mode")),
        "{:?}",
        h.alerts
    );
    // Only the non-safe-mode unit is signalled, with its own stop signal.
    assert_eq!(h.killed_names(), vec!["svc"]);
    assert_eq!(h.kills_of("svc"), vec![(libc::SIGINT, 20)]);
    assert_eq!(h.timer("svc", TimerKind::StopTimeout), Some(720));
    assert_eq!(h.phase("svc"), Phase::Stopping);
    assert_eq!(h.spawn_times("shell"), vec![20]);
    assert_eq!(
        (h.phase("keep"), h.st("keep").pid),
        (Phase::Running, keep_pid)
    );
    h.advance_to(30);
    h.exit("svc");
    assert_eq!(h.phase("svc"), Phase::Stopped);
    assert_eq!(h.sup.shown_phase(h.id("svc")), Phase::Stopped);
    assert_eq!(h.spawn_times("svc"), vec![0]);
    assert_eq!(h.spawn_times("crit"), vec![0, 10]);
}

#[test]
fn non_critical_exhaustion_alerts_and_others_keep_running() {
    let mut h = h(vec![
        unit("a").max_attempts(1),
        unit("b"),
        unit("c").requires(&["a"]),
    ]);
    h.boot();
    let b_pid = h.st("b").pid;
    h.fail("a");
    h.fail("a");
    assert_eq!(h.phase("a"), Phase::Failed);
    assert_eq!(h.alerts[0], "a: crashed 2 times (exit:1), giving up");
    assert_eq!(
        h.st("a").reason.as_deref(),
        Some("crashed 2 times (exit:1), giving up")
    );
    assert_eq!(h.actions("a"), ["restart", "gave_up"]);
    assert_eq!(h.sup.mode, Mode::Normal);
    // Only the unit requiring a is stopped; b is untouched.
    assert_eq!(h.killed_names(), vec!["c"]);
    assert_eq!(
        h.alerts[1..],
        ["c: stopping: required unit a failed".to_string()]
    );
    assert_eq!((h.phase("b"), h.st("b").pid), (Phase::Running, b_pid));
}

#[test]
fn fallback_to_safe_mode_acts_on_first_failure() {
    let mut h = h(vec![
        unit("a").strategy(Strategy::FallbackToSafeMode),
        unit("b"),
        unit("s").safe_mode(),
    ]);
    h.boot();
    h.advance_to(5);
    h.fail("a");
    assert_eq!(h.sup.mode, Mode::Safe);
    assert_eq!(h.phase("a"), Phase::Failed);
    assert_eq!(h.spawn_times("a"), vec![0]);
    assert_eq!(
        h.crash_log.last().map(|r| (r.attempt, r.action.as_str())),
        Some((1, "safe_mode"))
    );
    assert_eq!(h.killed_names(), vec!["b"]);
    assert_eq!(h.phase("s"), Phase::Running);
}

#[test]
fn notify_admin_acts_on_first_failure() {
    let mut h = h(vec![unit("a").strategy(Strategy::NotifyAdmin), unit("b")]);
    h.boot();
    h.fail("a");
    assert_eq!(h.phase("a"), Phase::Failed);
    assert_eq!(h.spawn_times("a"), vec![0]);
    assert_eq!(
        h.crash_log.last().map(|r| (r.attempt, r.action.as_str())),
        Some((1, "notify_admin"))
    );
    assert_eq!(
        h.alerts,
        vec!["a: crashed (exit:1); needs an admin".to_string()]
    );
    assert_eq!((h.sup.mode, h.phase("b")), (Mode::Normal, Phase::Running));
}

#[test]
fn auto_recovery_off_notifies_admin_even_for_critical() {
    let mut h = H::new(
        vec![unit("a").critical().max_attempts(3), unit("b")],
        false,
        100,
    );
    h.boot();
    h.fail("a");
    assert_eq!(h.phase("a"), Phase::Failed);
    assert_eq!(h.spawn_times("a"), vec![0]);
    assert_eq!(h.actions("a"), ["notify_admin"]);
    assert_eq!(h.sup.mode, Mode::Normal);
    assert!(h.kills.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Crash records

#[test]
fn crash_record_fields() {
    let mut h = h(vec![unit("a").delay(40)]);
    h.boot();
    h.advance_to(1234);
    h.crash(
        "a",
        ExitInfo::Signaled {
            signal: libc::SIGSEGV,
            core_dumped: true,
        },
    );
    let want = CrashRecord {
        unit: "a".into(),
        time_ms: WALL0 + 1234,
        exit: ExitInfo::Signaled {
            signal: libc::SIGSEGV,
            core_dumped: true,
        },
        core_dumped: true,
        uptime_ms: 1234,
        attempt: 1,
        action: "restart_in:40".into(),
    };
    assert_eq!(h.crash_log, vec![want.clone()]);
    assert_eq!(h.sup.crashes.back(), Some(&want));
    assert_eq!(h.st("a").last_exit, Some(want.exit));
    h.advance_to(1300);
    h.crash(
        "a",
        ExitInfo::Signaled {
            signal: libc::SIGSEGV,
            core_dumped: false,
        },
    );
    h.advance_to(1400);
    h.crash("a", ExitInfo::Exited { code: 3 });
    let got: Vec<(bool, u64, u32)> = h
        .crash_log
        .iter()
        .map(|r| (r.core_dumped, r.uptime_ms, r.attempt))
        .collect();
    assert_eq!(got, vec![(true, 1234, 1), (false, 26, 2), (false, 60, 3)]);
}

#[test]
fn crash_history_is_bounded() {
    let mut h = h(vec![unit("a").max_attempts(10_000)]);
    h.boot();
    for k in 1..=300 {
        h.advance_to(k);
        h.fail("a");
    }
    assert_eq!(h.crash_log.len(), 300);
    assert_eq!(h.sup.crashes.len(), CRASH_HISTORY);
    assert_eq!(
        h.sup.crashes.front().map(|r| r.attempt),
        Some(300 - CRASH_HISTORY as u32 + 1)
    );
    assert_eq!(h.sup.crashes.back().map(|r| r.attempt), Some(300));
}

// ---------------------------------------------------------------------------------------------
// Dependencies

#[test]
fn start_order_follows_dependencies_then_priority() {
    // Declared out of order on purpose; the harness asserts deps run at each spawn.
    let mut h = h(vec![
        unit("c").requires(&["b"]),
        unit("b").after(&["a"]),
        unit("a"),
        unit("z").priority(Priority::Critical),
        unit("y").priority(Priority::Background),
    ]);
    h.boot();
    let order: Vec<&str> = h
        .sup
        .start_order()
        .iter()
        .map(|&i| h.sup.units[i].name.as_str())
        .collect();
    assert_eq!(order, vec!["z", "a", "b", "c", "y"]);
    // b can only be spawned once a's Spawned made it running; y needs nobody and goes first.
    assert_eq!(h.spawn_order(), vec!["z", "a", "y", "b", "c"]);
}

#[test]
fn notify_dependents_wait_for_ready() {
    let mut h = h(vec![
        unit("a").notify(5000),
        unit("b").after(&["a"]).notify(5000),
        unit("c").requires(&["b"]),
    ]);
    h.boot();
    assert_eq!(h.spawn_order(), vec!["a"]);
    assert_eq!(h.phase("a"), Phase::Starting);
    assert_eq!(
        (h.phase("b"), h.sup.shown_phase(h.id("b"))),
        (Phase::Stopped, Phase::Starting)
    );
    assert_eq!(h.timer("a", TimerKind::ReadyTimeout), Some(5000));
    h.advance_to(100);
    h.ready("a");
    assert_eq!(h.phase("a"), Phase::Running);
    assert_eq!(h.timer("a", TimerKind::ReadyTimeout), None);
    assert_eq!(h.spawn_order(), vec!["a", "b"]);
    h.advance_to(200);
    h.ready("b");
    assert_eq!(h.spawn_order(), vec!["a", "b", "c"]);
    assert_eq!(h.spawn_times("c"), vec![200]);
    assert_eq!(h.phase("c"), Phase::Running);
}

#[test]
fn ready_timeout_kills_and_counts_as_failure() {
    let mut h = h(vec![unit("a").notify(500), unit("b").after(&["a"])]);
    h.boot();
    h.advance_to(499);
    assert!(h.kills.is_empty());
    h.advance_to(500);
    assert_eq!(h.kills_of("a"), vec![(KILL, 500)]);
    assert_eq!(h.phase("a"), Phase::Starting);
    h.crash(
        "a",
        ExitInfo::Signaled {
            signal: KILL,
            core_dumped: false,
        },
    );
    let r = h.crash_log.last().cloned();
    assert_eq!(
        r.map(|r| (r.exit, r.attempt, r.uptime_ms, r.action)),
        Some((ExitInfo::ReadyTimeout, 1, 500, "restart".into()))
    );
    assert_eq!(h.st("a").last_exit, Some(ExitInfo::ReadyTimeout));
    assert_eq!(h.spawn_times("a"), vec![0, 500]);
    assert_eq!(h.timer("a", TimerKind::ReadyTimeout), Some(1000));
    assert!(!h.st("a").ready_timed_out);
    assert_eq!(h.spawn_times("b"), Vec::<Ms>::new());
}

#[test]
fn required_unit_failing_for_good_stops_running_requirers() {
    let mut h = h(vec![
        unit("a").strategy(Strategy::NotifyAdmin),
        unit("b").requires(&["a"]),
        unit("c").requires(&["b"]),
        unit("d").after(&["a"]),
    ]);
    h.boot();
    h.advance_to(10);
    h.fail("a");
    assert_eq!(h.phase("a"), Phase::Failed);
    let mut killed = h.killed_names();
    killed.sort_unstable();
    assert_eq!(killed, vec!["b", "c"]);
    assert!(
        h.alerts
            .contains(&"b: stopping: required unit a failed".to_string()),
        "{:?}",
        h.alerts
    );
    h.exit("b");
    h.exit("c");
    for n in ["b", "c"] {
        assert_eq!(h.phase(n), Phase::Stopped, "{n}");
        assert!(!h.st(n).wanted, "{n}");
        assert_eq!(h.spawn_times(n), vec![0], "{n} restarted");
    }
    assert_eq!(h.st("b").reason.as_deref(), Some("required unit a failed"));
    assert_eq!(h.phase("d"), Phase::Running);
}

#[test]
fn required_unit_failing_for_good_fails_waiting_requirer() {
    let mut h = h(vec![
        unit("a").notify(1000).strategy(Strategy::NotifyAdmin),
        unit("b").requires(&["a"]),
    ]);
    h.boot();
    assert_eq!(h.sup.shown_phase(h.id("b")), Phase::Starting);
    h.fail("a");
    assert_eq!(h.phase("a"), Phase::Failed);
    assert_eq!(h.phase("b"), Phase::Failed);
    assert_eq!(h.spawn_times("b"), Vec::<Ms>::new());
    // An admin start of b pulls a in again and clears both failures.
    let b = h.id("b");
    h.feed(Event::Start(b));
    assert_eq!(h.spawn_order(), vec!["a", "a"]);
    h.ready("a");
    assert_eq!(h.spawn_order(), vec!["a", "a", "b"]);
}

#[test]
fn requires_pulls_in_disabled_unit_but_after_does_not() {
    let mut h = h(vec![
        unit("a").disabled(),
        unit("b").requires(&["a"]),
        unit("c").disabled(),
        unit("d").after(&["c"]),
    ]);
    h.boot();
    assert_eq!(h.spawn_order(), vec!["a", "d", "b"]);
    assert!(h.st("a").wanted);
    assert!(!h.st("c").wanted);
    assert_eq!(h.phase("c"), Phase::Stopped);
}

#[test]
fn admin_stop_stops_requirers_only() {
    let mut h = h(vec![
        unit("a"),
        unit("b").requires(&["a"]),
        unit("c").requires(&["b"]),
        unit("d").after(&["a"]),
    ]);
    h.boot();
    h.advance_to(10);
    let a = h.id("a");
    h.feed(Event::Stop(a));
    // Stopped from the top of the requires chain down, each after the one above is gone.
    assert_eq!(h.killed_names(), vec!["c"]);
    for n in ["c", "b", "a"] {
        assert_eq!(h.phase(n), Phase::Stopping);
        h.exit(n);
    }
    assert_eq!(h.killed_names(), vec!["c", "b", "a"]);
    for n in ["a", "b", "c"] {
        assert_eq!((h.phase(n), h.st(n).wanted), (Phase::Stopped, false), "{n}");
    }
    assert!(h.crash_log.is_empty());
    assert_eq!(h.spawns.len(), 4);
    assert_eq!(h.phase("d"), Phase::Running);
}

#[test]
fn admin_stop_cancels_backoff() {
    let mut h = h(vec![unit("a").delay(1000)]);
    h.boot();
    h.fail("a");
    assert_eq!(h.timer("a", TimerKind::Restart), Some(1000));
    let a = h.id("a");
    h.feed(Event::Stop(a));
    assert_eq!(
        (h.phase("a"), h.timer("a", TimerKind::Restart)),
        (Phase::Stopped, None)
    );
    h.advance_to(5000);
    assert_eq!(h.spawn_times("a"), vec![0]);
}

// ---------------------------------------------------------------------------------------------
// Shutdown

#[test]
fn shutdown_stops_dependents_before_dependencies() {
    let mut h = h(vec![
        unit("a"),
        unit("b").after(&["a"]),
        unit("c").requires(&["b"]),
    ]);
    h.boot();
    h.advance_to(100);
    h.feed(Event::Shutdown);
    assert_eq!(h.killed_names(), vec!["c"]);
    h.advance_to(110);
    h.exit("c");
    assert_eq!(h.killed_names(), vec!["c", "b"]);
    h.advance_to(120);
    h.exit("b");
    assert_eq!(h.killed_names(), vec!["c", "b", "a"]);
    assert_eq!(h.kills_of("a"), vec![(TERM, 120)]);
    assert_eq!(h.units_down, 0);
    h.exit("a");
    assert_eq!(h.units_down, 1);
    assert_eq!(h.spawns.len(), 3);
}

#[test]
fn shutdown_stops_lower_priorities_first() {
    let mut h = h(vec![
        unit("crit").priority(Priority::Critical),
        unit("high").priority(Priority::High),
        unit("norm").priority(Priority::Normal),
        unit("norm2").priority(Priority::Normal),
        unit("low").priority(Priority::Low),
        unit("bg").priority(Priority::Background),
    ]);
    h.boot();
    h.feed(Event::Shutdown);
    assert_eq!(h.killed_names(), vec!["bg"]);
    h.exit("bg");
    assert_eq!(h.killed_names(), vec!["bg", "low"]);
    h.exit("low");
    let mut next: Vec<&str> = h.killed_names()[2..].to_vec();
    next.sort_unstable();
    assert_eq!(next, vec!["norm", "norm2"]);
    h.exit("norm");
    assert_eq!(
        h.kills.len(),
        4,
        "high signalled before all normal units are down"
    );
    h.exit("norm2");
    assert_eq!(h.killed_names()[4..], ["high"]);
    h.exit("high");
    assert_eq!(h.killed_names()[5..], ["crit"]);
    assert_eq!(h.units_down, 0);
    h.exit("crit");
    assert_eq!(h.units_down, 1);
}

#[test]
fn shutdown_escalates_to_sigkill_after_stop_timeout() {
    let mut h = h(vec![unit("a").stop(libc::SIGUSR1, 300)]);
    h.boot();
    h.advance_to(1000);
    h.feed(Event::Shutdown);
    assert_eq!(h.kills_of("a"), vec![(libc::SIGUSR1, 1000)]);
    h.advance_to(1299);
    assert_eq!(h.kills.len(), 1);
    h.advance_to(1300);
    assert_eq!(h.kills_of("a"), vec![(libc::SIGUSR1, 1000), (KILL, 1300)]);
    h.crash(
        "a",
        ExitInfo::Signaled {
            signal: KILL,
            core_dumped: false,
        },
    );
    assert_eq!(h.phase("a"), Phase::Stopped);
    assert!(h.timers.is_empty(), "{:?}", h.timers);
    assert_eq!(h.units_down, 1);
    assert!(h.crash_log.is_empty());
}

#[test]
fn units_down_reported_exactly_once() {
    let mut h = h(vec![unit("a")]);
    h.boot();
    h.feed(Event::Shutdown);
    h.exit("a");
    assert_eq!(h.units_down, 1);
    h.feed(Event::Shutdown);
    assert_eq!(h.units_down, 1);
    // Admin start while shutting down is refused.
    let a = h.id("a");
    h.feed(Event::Start(a));
    assert_eq!(h.spawns.len(), 1);

    // Nothing running at all: reported at once.
    let mut h2 = H::new(vec![unit("x").disabled()], true, 100);
    h2.boot();
    h2.feed(Event::Shutdown);
    assert_eq!(h2.units_down, 1);
}

#[test]
fn shutdown_cancels_backoff_and_does_not_restart() {
    let mut h = h(vec![unit("a").delay(1000), unit("b")]);
    h.boot();
    h.advance_to(10);
    h.fail("a");
    assert_eq!(h.timer("a", TimerKind::Restart), Some(1010));
    h.advance_to(20);
    h.feed(Event::Shutdown);
    assert_eq!(
        (h.phase("a"), h.timer("a", TimerKind::Restart)),
        (Phase::Stopped, None)
    );
    assert_eq!(h.killed_names(), vec!["b"]);
    // Even a late (stale) Restart timer does not bring it back.
    let a = h.id("a");
    h.feed(Event::Timer {
        unit: a,
        kind: TimerKind::Restart,
    });
    h.advance_to(5000);
    assert_eq!(h.spawn_times("a"), vec![0]);
    h.exit("b");
    assert_eq!(h.units_down, 1);
}

#[test]
fn crash_during_shutdown_is_not_restarted() {
    let mut h = h(vec![unit("a"), unit("b").after(&["a"])]);
    h.boot();
    h.advance_to(50);
    h.feed(Event::Shutdown);
    assert_eq!(h.killed_names(), vec!["b"]);
    // a dies on its own while waiting for b.
    h.fail("a");
    assert_eq!(h.phase("a"), Phase::Stopped);
    assert_eq!(
        h.crash_log
            .last()
            .map(|r| (r.unit.as_str(), r.action.as_str(), r.attempt)),
        Some(("a", "stopped", 0))
    );
    assert_eq!(h.spawns.len(), 2);
    assert_eq!(h.units_down, 0);
    h.exit("b");
    assert_eq!(h.units_down, 1);
    assert_eq!(h.kills_of("a"), vec![]);
}

// ---------------------------------------------------------------------------------------------
// max_running, stale timers

#[test]
fn max_running_limits_concurrent_units() {
    let mut h = H::new(vec![unit("a"), unit("b"), unit("c")], true, 2);
    h.boot();
    assert_eq!(h.spawn_order(), vec!["a", "b"]);
    assert_eq!(
        h.st("c").reason.as_deref(),
        Some("waiting: max_concurrent_processes (2) reached")
    );
    assert_eq!(h.sup.shown_phase(h.id("c")), Phase::Starting);
    let a = h.id("a");
    h.advance_to(10);
    h.feed(Event::Stop(a));
    assert_eq!(h.spawns.len(), 2, "a stopping process still counts");
    h.advance_to(20);
    h.exit("a");
    assert_eq!(h.spawn_order(), vec!["a", "b", "c"]);
    assert_eq!(h.spawn_times("c"), vec![20]);
    assert_eq!(h.st("c").reason, None);
}

#[test]
fn stale_timers_are_ignored() {
    let mut h = h(vec![unit("a").notify(500).delay(100)]);
    h.boot();
    h.ready("a");
    let a = h.id("a");
    let before = h.sup.states[a].clone();
    for kind in [
        TimerKind::Restart,
        TimerKind::StopTimeout,
        TimerKind::ReadyTimeout,
    ] {
        h.feed(Event::Timer { unit: a, kind });
    }
    assert_eq!(h.sup.states[a], before);
    assert!(h.kills.is_empty());
    assert_eq!(h.spawns.len(), 1);
    // Stable for an instance that is not running (in backoff) does not clear the count.
    h.advance_to(10);
    h.fail("a");
    h.feed(Event::Timer {
        unit: a,
        kind: TimerKind::Stable,
    });
    assert_eq!((h.phase("a"), h.st("a").attempts), (Phase::Backoff, 1));
    // Ready for a unit that is not starting is ignored.
    h.feed(Event::Ready(a));
    assert_eq!(h.phase("a"), Phase::Backoff);
    // Exited for a unit with no process is ignored.
    h.feed(Event::Exited {
        unit: a,
        exit: ExitInfo::Exited { code: 1 },
    });
    assert_eq!((h.phase("a"), h.crash_log.len()), (Phase::Backoff, 1));
}

// ---------------------------------------------------------------------------------------------
// Bugs found (failing on purpose until mod.rs is fixed)

// Regression: a unit that fails for good (gave_up / notify_admin) must let waiting units go.
// A unit ordered only `after` it waits while the dependency is wanted and not running; once
// the dependency is failed (wanted = false) it should start, but nothing re-evaluates it, so
// it stays "starting" (stopped + wanted) until some unrelated event happens to kick.
#[test]
fn after_dependent_starts_once_dependency_fails_for_good() {
    let mut h = h(vec![
        unit("a").notify(1000).strategy(Strategy::NotifyAdmin),
        unit("b").after(&["a"]),
    ]);
    h.boot();
    assert_eq!(h.spawn_order(), vec!["a"]);
    h.advance_to(10);
    h.fail("a");
    assert_eq!(h.phase("a"), Phase::Failed);
    assert_eq!(
        h.spawn_times("b"),
        vec![10],
        "b (after = [a]) left waiting forever"
    );
}

// Regression, same root cause with max_running: a unit that fails for good frees its slot but the
// unit queued on `max_concurrent_processes` is not started.
#[test]
fn max_running_slot_freed_by_failed_unit_is_reused() {
    let mut h = H::new(
        vec![unit("a").strategy(Strategy::NotifyAdmin), unit("b")],
        true,
        1,
    );
    h.boot();
    assert_eq!(h.spawn_order(), vec!["a"]);
    h.advance_to(10);
    h.fail("a");
    assert_eq!(h.phase("a"), Phase::Failed);
    assert_eq!(
        h.spawn_times("b"),
        vec![10],
        "b still queued although nothing runs"
    );
}

// Admin stop of a unit stops the units requiring it first and waits for them to exit.
#[test]
fn admin_stop_signals_requirers_first() {
    let mut h = h(vec![unit("a"), unit("b").requires(&["a"])]);
    h.boot();
    let a = h.id("a");
    h.feed(Event::Stop(a));
    assert_eq!(h.killed_names(), vec!["b"], "a waits until b is down");
    h.exit("b");
    assert_eq!(h.killed_names(), vec!["b", "a"]);
}

#[test]
fn reload_keeps_unchanged_state_and_reports_changes() {
    let mut h = h(vec![unit("keep"), unit("change"), unit("gone")]);
    h.boot();
    h.advance_to(10);
    let keep_pid = h.st("keep").pid;
    let gone_pid = h.st("gone").pid;
    let new_units = vec![
        unit("keep").0,
        unit("change").priority(Priority::High).0,
        unit("new").0,
    ];
    let (next, plan) = h.sup.reloaded(new_units);
    let name = |i: usize| next.units[i].name.clone();
    assert_eq!(
        plan.unchanged.iter().map(|&i| name(i)).collect::<Vec<_>>(),
        vec!["keep"]
    );
    assert_eq!(
        plan.changed.iter().map(|&i| name(i)).collect::<Vec<_>>(),
        vec!["change"]
    );
    assert_eq!(
        plan.added.iter().map(|&i| name(i)).collect::<Vec<_>>(),
        vec!["new"]
    );
    assert_eq!(plan.removed.len(), 1);
    assert_eq!(
        (plan.removed[0].name.as_str(), plan.removed[0].pid),
        ("gone", gone_pid)
    );
    let k = next.find("keep").unwrap();
    assert_eq!(next.states[k].pid, keep_pid);
    assert_eq!(next.states[k].phase, Phase::Running);
    assert_eq!(plan.remap[h.id("keep")], Some(k));
    assert_eq!(plan.remap[h.id("gone")], None);
}

#[test]
fn huge_timeouts_saturate_instead_of_wrapping() {
    // reset_after_ms = u64::MAX (e.g. from an absurd recovery_timeout_seconds) must not wrap
    // into "stable at once": attempts keep counting and max_attempts still ends the loop.
    let mut h = h(vec![unit("a").reset_after(u64::MAX).max_attempts(2)]);
    h.boot();
    for t in [10, 20, 30] {
        h.advance_to(t);
        h.fail("a");
    }
    assert_eq!(h.phase("a"), Phase::Failed);
    assert_eq!(h.spawn_times("a").len(), 3);
}

#[test]
fn spawned_for_a_unit_no_longer_starting_is_killed_not_run() {
    let mut h = h(vec![unit("a")]);
    h.boot();
    let a = h.id("a");
    h.advance_to(10);
    h.feed(Event::Stop(a));
    h.exit("a");
    assert_eq!(h.phase("a"), Phase::Stopped);
    // A late Spawned (a spawn queued before the stop) must not make it running.
    h.feed(Event::Spawned { unit: a, pid: 4242 });
    assert_eq!(h.phase("a"), Phase::Stopping);
    assert_eq!(h.kills.last().map(|k| (k.unit, k.signal)), Some((a, KILL)));
    assert_eq!(h.st("a").pid, Some(4242));
    h.exit("a");
    assert_eq!(h.phase("a"), Phase::Stopped);
}

#[test]
fn a_unit_that_survives_sigkill_is_abandoned_so_shutdown_completes() {
    let mut h = h(vec![unit("stuck").stop(TERM, 100), unit("other")]);
    h.boot();
    h.advance_to(10);
    h.feed(Event::Shutdown);
    h.exit("other");
    h.advance_to(110); // stop timeout: SIGKILL
    assert_eq!(h.kills_of("stuck"), vec![(TERM, 10), (KILL, 110)]);
    assert_eq!(h.units_down, 0);
    h.advance_to(110 + KILL_GRACE_MS); // still there: abandoned
    assert_eq!(h.phase("stuck"), Phase::Stopped);
    assert_eq!(h.st("stuck").pid, None);
    assert_eq!(h.units_down, 1);
}

#[test]
fn restart_of_a_unit_not_allowed_in_this_mode_stops_it() {
    // In safe mode a reload drops `safe_mode` from a running unit; the restart the reload asks
    // for must stop it, not bring it back.
    let mut h = h(vec![unit("a").safe_mode()]);
    h.boot();
    h.advance_to(10);
    h.feed(Event::EnterSafeMode {
        reason: "test".into(),
    });
    assert_eq!(h.phase("a"), Phase::Running);
    let (next, plan) = h.sup.reloaded(vec![unit("a").0]);
    h.sup = next;
    assert_eq!(plan.changed.len(), 1);
    let a = h.id("a");
    h.feed(Event::Restart(a));
    assert_eq!(h.phase("a"), Phase::Stopping);
    h.exit("a");
    assert_eq!(h.phase("a"), Phase::Stopped);
    assert_eq!(h.spawn_times("a").len(), 1);
}
