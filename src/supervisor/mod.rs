//! The unit state machine: pure, driven by events and an injected clock, answering with actions
//! for the event loop to carry out. No syscalls here.
//!
//! States: `stopped` → `starting` (spawned, waiting for readiness) → `running` → `stopping` →
//! `stopped`; a failure leads to `backoff` (a restart is due later), straight back to
//! `starting`, or to `failed`. A unit whose dependencies are not up yet waits in `stopped` with
//! `wanted` set (shown as `starting` without a pid).

pub mod restart;

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::config::model::{Priority, Unit};
use restart::Decision;

/// Milliseconds of the monotonic clock.
pub type Ms = u64;

/// How long a unit may outlive its SIGKILL before tau-init stops waiting for it.
pub const KILL_GRACE_MS: u64 = 5000;

/// Most crash records kept in memory and on disk.
pub const CRASH_HISTORY: usize = 256;

/// How an instance of a unit ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ExitInfo {
    /// exit(code).
    Exited { code: i32 },
    /// Killed by a signal.
    Signaled { signal: i32, core_dumped: bool },
    /// fork/exec failed before the program ran.
    SpawnFailed { errno: i32 },
    /// `ready = "notify"` and no READY=1 in time.
    ReadyTimeout,
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitInfo::Exited { code } => write!(f, "exit:{code}"),
            ExitInfo::Signaled {
                signal,
                core_dumped,
            } => {
                write!(
                    f,
                    "signal:{signal}{}",
                    if *core_dumped { ":core" } else { "" }
                )
            }
            ExitInfo::SpawnFailed { errno } => write!(f, "spawn-failed:{errno}"),
            ExitInfo::ReadyTimeout => write!(f, "ready-timeout"),
        }
    }
}

/// Phase of a unit, as shown by `taucli status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Stopped,
    Starting,
    Running,
    Stopping,
    Backoff,
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Stopped => "stopped",
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Stopping => "stopping",
            Phase::Backoff => "backoff",
            Phase::Failed => "failed",
        }
    }
}

/// System mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Normal,
    Safe,
}

/// Per-unit timers the supervisor asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TimerKind {
    /// A restart is due (backoff over).
    Restart,
    /// The stop signal was sent this long ago: SIGKILL now.
    StopTimeout,
    /// No READY=1 in time.
    ReadyTimeout,
    /// The instance has been up for `reset_after_ms`: clear the failure count.
    Stable,
}

/// Runtime state of one unit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitState {
    pub phase: Phase,
    /// Should be up (boot set, admin start, safe-mode set).
    pub wanted: bool,
    pub pid: Option<i32>,
    /// When the current phase began.
    pub since: Ms,
    /// When the current (or last) instance was spawned.
    pub started_at: Ms,
    /// Failures counted against `max_attempts` since the last reset.
    pub attempts: u32,
    /// Restarts done by recovery, in total (`TAU_RESTART_COUNT`).
    pub restarts: u32,
    pub last_exit: Option<ExitInfo>,
    /// When a restart is due (phase `backoff`).
    pub restart_at: Option<Ms>,
    /// Start again once stopped (admin restart).
    pub restart_after_stop: bool,
    /// The instance is being killed because it never became ready.
    pub ready_timed_out: bool,
    /// Why the unit is failed or waiting, in plain words.
    pub reason: Option<String>,
    /// Admin stop: signal once every unit that requires this one is down.
    #[serde(default)]
    pub stop_queued: bool,
    /// SIGKILL was sent after the stop timeout.
    #[serde(default)]
    pub sigkill_sent: bool,
}

impl UnitState {
    fn new() -> Self {
        Self {
            phase: Phase::Stopped,
            wanted: false,
            pid: None,
            since: 0,
            started_at: 0,
            attempts: 0,
            restarts: 0,
            last_exit: None,
            restart_at: None,
            restart_after_stop: false,
            ready_timed_out: false,
            reason: None,
            stop_queued: false,
            sigkill_sent: false,
        }
    }

    /// Has a live process (or is about to).
    pub fn is_up(&self) -> bool {
        matches!(
            self.phase,
            Phase::Starting | Phase::Running | Phase::Stopping
        )
    }
}

/// One crash, as recorded in the crash history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CrashRecord {
    pub unit: String,
    /// Wall-clock time, ms since the Unix epoch.
    pub time_ms: u64,
    pub exit: ExitInfo,
    pub core_dumped: bool,
    /// How long the instance had been up.
    pub uptime_ms: u64,
    /// Failure number counted against `max_attempts`.
    pub attempt: u32,
    /// What tau-init did: `restart`, `restart_in:<ms>`, `safe_mode`, `notify_admin`, `gave_up`,
    /// `stopped` (during shutdown).
    pub action: String,
}

/// Inputs to the state machine.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Boot: start every enabled unit allowed in `mode`.
    Boot { mode: Mode },
    /// Admin start.
    Start(usize),
    /// Admin stop.
    Stop(usize),
    /// Admin restart (not counted as a failure).
    Restart(usize),
    /// The executor spawned the unit.
    Spawned { unit: usize, pid: i32 },
    /// The executor could not spawn it.
    SpawnFailed {
        unit: usize,
        errno: i32,
        message: String,
    },
    /// READY=1 from the unit's main pid.
    Ready(usize),
    /// The unit's main process ended.
    Exited { unit: usize, exit: ExitInfo },
    /// A timer the supervisor set fired.
    Timer { unit: usize, kind: TimerKind },
    /// Switch to safe mode (admin or kernel command line after boot).
    EnterSafeMode { reason: String },
    /// Stop everything in order, then report [`Action::UnitsDown`].
    Shutdown,
}

/// Log levels of [`Action::Log`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
}

/// What the executor must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Spawn(usize),
    /// Send `signal` to the unit's process (and its cgroup, where it has one).
    Kill {
        unit: usize,
        pid: i32,
        signal: i32,
    },
    SetTimer {
        unit: usize,
        kind: TimerKind,
        at: Ms,
    },
    CancelTimer {
        unit: usize,
        kind: TimerKind,
    },
    Crash(CrashRecord),
    /// Tell the admin (log + console).
    Alert(String),
    Log(Level, String),
    /// Durable state changed: save it.
    Persist,
    /// Shutdown: every unit is down.
    UnitsDown,
}

impl Action {
    /// Cancel a unit's timer.
    pub fn cancel(unit: usize, kind: TimerKind) -> Self {
        Action::CancelTimer { unit, kind }
    }

    /// Set a unit's timer.
    pub fn set(unit: usize, kind: TimerKind, at: Ms) -> Self {
        Action::SetTimer { unit, kind, at }
    }
}

/// Clock readings passed with each event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub mono: Ms,
    pub wall: u64,
}

/// All units and their states.
#[derive(Debug, Clone)]
pub struct Supervisor {
    pub units: Vec<Unit>,
    pub states: Vec<UnitState>,
    pub mode: Mode,
    pub shutting_down: bool,
    pub crashes: VecDeque<CrashRecord>,
    pub auto_recovery: bool,
    /// Most units up at once.
    pub max_running: usize,
    index: HashMap<String, usize>,
    /// Indices of after ∪ requires.
    deps: Vec<Vec<usize>>,
    requires: Vec<Vec<usize>>,
    start_order: Vec<usize>,
    /// Units that must be down before this one is stopped at shutdown.
    stop_wait: Vec<Vec<usize>>,
    /// Shutdown already reported [`Action::UnitsDown`].
    down_reported: bool,
}

impl Supervisor {
    /// Build from validated units (dependencies on unknown names are ignored here: the loader
    /// has already reported them).
    pub fn new(units: Vec<Unit>, auto_recovery: bool, max_running: usize) -> Self {
        let index: HashMap<String, usize> = units
            .iter()
            .enumerate()
            .map(|(i, u)| (u.name.clone(), i))
            .collect();
        let lookup = |names: &[String]| -> Vec<usize> {
            let mut v: Vec<usize> = names.iter().filter_map(|n| index.get(n).copied()).collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        let requires: Vec<Vec<usize>> = units.iter().map(|u| lookup(&u.requires)).collect();
        let deps: Vec<Vec<usize>> = units
            .iter()
            .map(|u| {
                let mut all = u.after.clone();
                all.extend(u.requires.iter().cloned());
                lookup(&all)
            })
            .collect();
        let mut dependents = vec![Vec::new(); units.len()];
        for (i, ds) in deps.iter().enumerate() {
            for &d in ds {
                dependents[d].push(i);
            }
        }
        let start_order = topo_order(&units, &deps, false);
        let stop_order = topo_order(&units, &dependents, true);
        let mut pos = vec![0usize; units.len()];
        for (p, &u) in stop_order.iter().enumerate() {
            pos[u] = p;
        }
        // Wait for dependents, and for less important units placed earlier in the stop order.
        let stop_wait = (0..units.len())
            .map(|u| {
                stop_order
                    .iter()
                    .take(pos[u])
                    .copied()
                    .filter(|&v| {
                        dependents[u].contains(&v) || units[v].priority > units[u].priority
                    })
                    .collect()
            })
            .collect();
        let states = vec![UnitState::new(); units.len()];
        Self {
            units,
            states,
            mode: Mode::Normal,
            shutting_down: false,
            crashes: VecDeque::new(),
            auto_recovery,
            max_running: max_running.max(1),
            index,
            deps,
            requires,
            start_order,
            stop_wait,
            down_reported: false,
        }
    }

    /// Index of a unit by name.
    pub fn find(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// Start order (dependencies first, then by priority and name).
    pub fn start_order(&self) -> &[usize] {
        &self.start_order
    }

    /// Shown state name: a wanted unit waiting for dependencies shows as `starting`.
    pub fn shown_phase(&self, i: usize) -> Phase {
        let s = &self.states[i];
        if s.phase == Phase::Stopped && s.wanted && !self.shutting_down {
            Phase::Starting
        } else {
            s.phase
        }
    }

    fn allowed(&self, i: usize) -> bool {
        let u = &self.units[i];
        match self.mode {
            Mode::Normal => !u.safe_mode_only,
            Mode::Safe => u.safe_mode || u.safe_mode_only,
        }
    }

    fn set_phase(&mut self, i: usize, phase: Phase, now: Now) {
        let s = &mut self.states[i];
        s.phase = phase;
        s.since = now.mono;
    }

    /// Feed one event; returns the actions to carry out, in order.
    pub fn handle(&mut self, ev: Event, now: Now) -> Vec<Action> {
        let mut out = Vec::new();
        match ev {
            Event::Boot { mode } => {
                self.mode = mode;
                for i in self.start_order.clone() {
                    if self.units[i].enabled && self.allowed(i) {
                        self.want(i);
                    }
                }
                self.kick(now, &mut out);
            }
            Event::Start(i) => {
                if self.shutting_down {
                    out.push(Action::Log(
                        Level::Warn,
                        format!("{}: not started: shutting down", self.units[i].name),
                    ));
                    return out;
                }
                if !self.allowed(i) {
                    out.push(Action::Log(
                        Level::Warn,
                        format!(
                            "{}: not started: not allowed in {} mode",
                            self.units[i].name,
                            self.mode_str()
                        ),
                    ));
                    return out;
                }
                self.want(i);
                for j in 0..self.units.len() {
                    if self.states[j].wanted && self.states[j].phase == Phase::Failed {
                        // An admin start clears the failure (and those of the deps it pulls in).
                        let s = &mut self.states[j];
                        s.phase = Phase::Stopped;
                        s.attempts = 0;
                        s.reason = None;
                    }
                }
                self.kick(now, &mut out);
            }
            Event::Stop(i) => {
                self.stop_with_requirers(i, now, &mut out);
                self.kick(now, &mut out);
            }
            Event::Restart(i) if !self.allowed(i) => {
                // e.g. a reload changed a running unit so it no longer belongs in this mode.
                out.push(Action::Log(
                    Level::Warn,
                    format!(
                        "{}: not allowed in {} mode; stopping instead of restarting",
                        self.units[i].name,
                        self.mode_str()
                    ),
                ));
                self.stop_with_requirers(i, now, &mut out);
            }
            Event::Restart(i) => {
                let s = &mut self.states[i];
                s.attempts = 0;
                s.reason = None;
                if s.phase == Phase::Backoff {
                    // Do not wait for the backoff: start now.
                    out.push(Action::cancel(i, TimerKind::Restart));
                    s.restart_at = None;
                    s.wanted = true;
                    self.set_phase(i, Phase::Stopped, now);
                    self.kick(now, &mut out);
                } else if s.is_up() {
                    s.restart_after_stop = true;
                    s.wanted = true;
                    self.begin_stop(i, now, &mut out);
                } else {
                    return self.handle(Event::Start(i), now);
                }
            }
            Event::Spawned { unit: i, pid } if self.states[i].phase != Phase::Starting => {
                // Not wanted any more (stopped while the spawn was pending): end it at once.
                let (name, timeout) = (self.units[i].name.clone(), self.units[i].stop_timeout_ms);
                out.push(Action::Log(
                    Level::Warn,
                    format!("{name}: started after it was stopped; killing pid {pid}"),
                ));
                self.states[i].pid = Some(pid);
                self.states[i].started_at = now.mono;
                self.set_phase(i, Phase::Stopping, now);
                out.push(Action::Kill {
                    unit: i,
                    pid,
                    signal: libc::SIGKILL,
                });
                out.push(Action::set(
                    i,
                    TimerKind::StopTimeout,
                    now.mono.saturating_add(timeout),
                ));
            }
            Event::Spawned { unit: i, pid } => {
                self.states[i].pid = Some(pid);
                self.states[i].started_at = now.mono;
                self.states[i].ready_timed_out = false;
                let u = &self.units[i];
                out.push(Action::Log(
                    Level::Info,
                    format!("{}: started, pid {pid}", u.name),
                ));
                if u.ready == crate::config::model::Ready::Notify {
                    out.push(Action::set(
                        i,
                        TimerKind::ReadyTimeout,
                        now.mono.saturating_add(u.ready_timeout_ms),
                    ));
                } else {
                    self.became_running(i, now, &mut out);
                }
            }
            Event::SpawnFailed {
                unit: i,
                errno,
                message,
            } => {
                out.push(Action::Log(
                    Level::Error,
                    format!("{}: {message}", self.units[i].name),
                ));
                self.states[i].started_at = now.mono;
                self.failure(i, ExitInfo::SpawnFailed { errno }, now, &mut out);
            }
            Event::Ready(i) => {
                if self.states[i].phase == Phase::Starting {
                    out.push(Action::cancel(i, TimerKind::ReadyTimeout));
                    out.push(Action::Log(
                        Level::Info,
                        format!("{}: ready", self.units[i].name),
                    ));
                    self.became_running(i, now, &mut out);
                }
            }
            Event::Exited { unit: i, exit } => self.exited(i, exit, now, &mut out),
            Event::Timer { unit: i, kind } => self.timer(i, kind, now, &mut out),
            Event::EnterSafeMode { reason } => self.enter_safe_mode(&reason, now, &mut out),
            Event::Shutdown => {
                if !self.shutting_down {
                    self.shutting_down = true;
                    out.push(Action::Log(Level::Info, "shutdown: stopping units".into()));
                }
                for i in 0..self.units.len() {
                    self.states[i].wanted = false;
                    if self.states[i].phase == Phase::Backoff {
                        out.push(Action::cancel(i, TimerKind::Restart));
                        self.set_phase(i, Phase::Stopped, now);
                    }
                }
                self.advance_shutdown(now, &mut out);
            }
        }
        out
    }

    fn mode_str(&self) -> &'static str {
        match self.mode {
            Mode::Normal => "normal",
            Mode::Safe => "safe",
        }
    }

    /// Mark a unit and everything it requires as wanted.
    fn want(&mut self, i: usize) {
        let mut stack = vec![i];
        while let Some(u) = stack.pop() {
            if self.states[u].wanted || !self.allowed(u) {
                continue;
            }
            self.states[u].wanted = true;
            stack.extend(self.requires[u].iter().copied());
        }
    }

    fn running_count(&self) -> usize {
        self.states.iter().filter(|s| s.is_up()).count()
    }

    /// Start every wanted, stopped unit whose dependencies are up; fail those whose required
    /// dependency failed.
    fn kick(&mut self, now: Now, out: &mut Vec<Action>) {
        self.advance_stops(now, out);
        if self.shutting_down {
            return;
        }
        let mut changed = true;
        while changed {
            changed = false;
            for i in self.start_order.clone() {
                let s = &self.states[i];
                if !s.wanted || s.phase != Phase::Stopped {
                    continue;
                }
                if let Some(&d) = self.requires[i]
                    .iter()
                    .find(|&&d| self.states[d].phase == Phase::Failed || !self.states[d].wanted)
                {
                    let why = format!("required unit {} is not running", self.units[d].name);
                    out.push(Action::Alert(format!(
                        "{}: failed: {why}",
                        self.units[i].name
                    )));
                    let s = &mut self.states[i];
                    s.wanted = false;
                    s.reason = Some(why);
                    self.set_phase(i, Phase::Failed, now);
                    changed = true;
                    continue;
                }
                let waiting = self.deps[i]
                    .iter()
                    .any(|&d| self.states[d].wanted && self.states[d].phase != Phase::Running);
                if waiting {
                    continue;
                }
                if self.running_count() >= self.max_running {
                    self.states[i].reason = Some(format!(
                        "waiting: max_concurrent_processes ({}) reached",
                        self.max_running
                    ));
                    continue;
                }
                self.states[i].reason = None;
                self.set_phase(i, Phase::Starting, now);
                out.push(Action::Spawn(i));
            }
        }
    }

    fn became_running(&mut self, i: usize, now: Now, out: &mut Vec<Action>) {
        self.set_phase(i, Phase::Running, now);
        let reset = self.units[i].recovery.reset_after_ms;
        out.push(Action::set(
            i,
            TimerKind::Stable,
            now.mono.saturating_add(reset),
        ));
        self.kick(now, out);
    }

    fn begin_stop(&mut self, i: usize, now: Now, out: &mut Vec<Action>) {
        let s = &self.states[i];
        match s.phase {
            Phase::Starting | Phase::Running => {
                let Some(pid) = s.pid else {
                    // Spawn requested but not yet carried out: nothing to signal.
                    self.set_phase(i, Phase::Stopped, now);
                    return;
                };
                let u = &self.units[i];
                out.push(Action::Log(
                    Level::Info,
                    format!("{}: stopping (signal {})", u.name, u.stop_signal),
                ));
                out.push(Action::cancel(i, TimerKind::ReadyTimeout));
                out.push(Action::cancel(i, TimerKind::Stable));
                out.push(Action::Kill {
                    unit: i,
                    pid,
                    signal: u.stop_signal,
                });
                out.push(Action::set(
                    i,
                    TimerKind::StopTimeout,
                    now.mono.saturating_add(u.stop_timeout_ms),
                ));
                self.set_phase(i, Phase::Stopping, now);
            }
            Phase::Backoff => {
                out.push(Action::cancel(i, TimerKind::Restart));
                self.states[i].restart_at = None;
                self.set_phase(i, Phase::Stopped, now);
            }
            Phase::Stopping | Phase::Stopped | Phase::Failed => {}
        }
    }

    /// Admin stop: the unit and every unit that (transitively) requires it; each is signalled
    /// once the units requiring it are down.
    fn stop_with_requirers(&mut self, i: usize, now: Now, out: &mut Vec<Action>) {
        let mut stack = vec![i];
        let mut seen = vec![false; self.units.len()];
        while let Some(u) = stack.pop() {
            if std::mem::replace(&mut seen[u], true) {
                continue;
            }
            let s = &mut self.states[u];
            s.wanted = false;
            s.restart_after_stop = false;
            s.stop_queued = true;
            if s.phase == Phase::Failed {
                s.phase = Phase::Stopped;
                s.reason = None;
            }
            for (j, req) in self.requires.iter().enumerate() {
                if req.contains(&u) {
                    stack.push(j);
                }
            }
        }
        self.advance_stops(now, out);
    }

    /// Signal queued admin stops whose requirers are all down.
    fn advance_stops(&mut self, now: Now, out: &mut Vec<Action>) {
        for u in 0..self.units.len() {
            if !self.states[u].stop_queued {
                continue;
            }
            let blocked = (0..self.units.len())
                .any(|j| self.requires[j].contains(&u) && self.states[j].is_up());
            if !blocked {
                self.states[u].stop_queued = false;
                self.begin_stop(u, now, out);
            }
        }
    }

    fn exited(&mut self, i: usize, exit: ExitInfo, now: Now, out: &mut Vec<Action>) {
        let phase = self.states[i].phase;
        self.states[i].pid = None;
        self.states[i].sigkill_sent = false;
        self.states[i].last_exit = Some(exit);
        out.push(Action::cancel(i, TimerKind::Stable));
        out.push(Action::cancel(i, TimerKind::ReadyTimeout));
        match phase {
            Phase::Stopping => {
                out.push(Action::cancel(i, TimerKind::StopTimeout));
                out.push(Action::Log(
                    Level::Info,
                    format!("{}: stopped ({exit})", self.units[i].name),
                ));
                self.set_phase(i, Phase::Stopped, now);
                if std::mem::take(&mut self.states[i].restart_after_stop) && !self.shutting_down {
                    self.states[i].wanted = true;
                }
                if self.shutting_down {
                    self.advance_shutdown(now, out);
                } else {
                    self.kick(now, out);
                }
            }
            Phase::Starting | Phase::Running => {
                let exit = if self.states[i].ready_timed_out {
                    ExitInfo::ReadyTimeout
                } else {
                    exit
                };
                self.failure(i, exit, now, out);
            }
            Phase::Stopped | Phase::Backoff | Phase::Failed => {}
        }
    }

    fn failure(&mut self, i: usize, exit: ExitInfo, now: Now, out: &mut Vec<Action>) {
        let name = self.units[i].name.clone();
        let rec = self.units[i].recovery.clone();
        let uptime = now.mono.saturating_sub(self.states[i].started_at);
        {
            let s = &mut self.states[i];
            s.pid = None;
            s.last_exit = Some(exit);
            s.ready_timed_out = false;
            if uptime >= rec.reset_after_ms {
                s.attempts = 0;
            }
        }
        let core_dumped = matches!(
            exit,
            ExitInfo::Signaled {
                core_dumped: true,
                ..
            }
        );
        if self.shutting_down {
            self.record(i, exit, core_dumped, uptime, "stopped", now, out);
            self.set_phase(i, Phase::Stopped, now);
            self.advance_shutdown(now, out);
            return;
        }
        if !self.states[i].wanted {
            // Exited while not wanted (e.g. a spawn that raced an admin stop).
            self.set_phase(i, Phase::Stopped, now);
            self.kick(now, out);
            return;
        }
        self.states[i].attempts += 1;
        let attempt = self.states[i].attempts;
        let critical = self.units[i].critical;
        match restart::decide(&rec, attempt, self.auto_recovery) {
            Decision::RestartIn(0) => {
                self.record(i, exit, core_dumped, uptime, "restart", now, out);
                out.push(Action::Log(
                    Level::Warn,
                    format!(
                        "{name}: crashed ({exit}), restarting (attempt {attempt}/{})",
                        rec.max_attempts
                    ),
                ));
                self.states[i].restarts += 1;
                self.set_phase(i, Phase::Stopped, now);
                self.kick(now, out);
            }
            Decision::RestartIn(ms) => {
                self.record(
                    i,
                    exit,
                    core_dumped,
                    uptime,
                    &format!("restart_in:{ms}"),
                    now,
                    out,
                );
                out.push(Action::Log(
                    Level::Warn,
                    format!(
                        "{name}: crashed ({exit}), restarting in {ms} ms (attempt {attempt}/{})",
                        rec.max_attempts
                    ),
                ));
                self.states[i].restart_at = Some(now.mono.saturating_add(ms));
                self.set_phase(i, Phase::Backoff, now);
                out.push(Action::set(
                    i,
                    TimerKind::Restart,
                    now.mono.saturating_add(ms),
                ));
            }
            Decision::Exhausted if critical && self.mode == Mode::Normal => {
                self.record(i, exit, core_dumped, uptime, "safe_mode", now, out);
                self.fail(i, format!("crashed {attempt} times ({exit})"), now);
                self.enter_safe_mode(
                    &format!("critical unit {name} failed {attempt} times"),
                    now,
                    out,
                );
            }
            Decision::Exhausted => {
                self.record(i, exit, core_dumped, uptime, "gave_up", now, out);
                let why = format!("crashed {attempt} times ({exit}), giving up");
                out.push(Action::Alert(format!("{name}: {why}")));
                self.fail(i, why, now);
                self.fail_requirers(i, now, out);
                self.kick(now, out);
            }
            Decision::SafeMode if self.mode == Mode::Normal => {
                self.record(i, exit, core_dumped, uptime, "safe_mode", now, out);
                self.fail(i, format!("crashed ({exit})"), now);
                self.enter_safe_mode(
                    &format!("unit {name} crashed ({exit}): fallback_to_safe_mode"),
                    now,
                    out,
                );
            }
            Decision::SafeMode | Decision::NotifyAdmin => {
                self.record(i, exit, core_dumped, uptime, "notify_admin", now, out);
                let why = format!("crashed ({exit})");
                out.push(Action::Alert(format!("{name}: {why}; needs an admin")));
                self.fail(i, why, now);
                self.fail_requirers(i, now, out);
                self.kick(now, out);
            }
        }
    }

    fn fail(&mut self, i: usize, why: String, now: Now) {
        let s = &mut self.states[i];
        s.wanted = false;
        s.reason = Some(why);
        s.restart_at = None;
        self.set_phase(i, Phase::Failed, now);
    }

    /// A unit failed for good: stop what requires it and mark it failed too.
    fn fail_requirers(&mut self, i: usize, now: Now, out: &mut Vec<Action>) {
        for j in 0..self.units.len() {
            if self.requires[j].contains(&i) && self.states[j].wanted {
                let why = format!("required unit {} failed", self.units[i].name);
                out.push(Action::Alert(format!(
                    "{}: stopping: {why}",
                    self.units[j].name
                )));
                self.states[j].wanted = false;
                self.states[j].reason = Some(why);
                self.begin_stop(j, now, out);
                if !self.states[j].is_up() {
                    self.set_phase(j, Phase::Failed, now);
                }
                self.fail_requirers(j, now, out);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &mut self,
        i: usize,
        exit: ExitInfo,
        core_dumped: bool,
        uptime: u64,
        action: &str,
        now: Now,
        out: &mut Vec<Action>,
    ) {
        let rec = CrashRecord {
            unit: self.units[i].name.clone(),
            time_ms: now.wall,
            exit,
            core_dumped,
            uptime_ms: uptime,
            attempt: self.states[i].attempts,
            action: action.to_string(),
        };
        if self.crashes.len() >= CRASH_HISTORY {
            self.crashes.pop_front();
        }
        self.crashes.push_back(rec.clone());
        out.push(Action::Crash(rec));
        out.push(Action::Persist);
    }

    fn timer(&mut self, i: usize, kind: TimerKind, now: Now, out: &mut Vec<Action>) {
        let s = &self.states[i];
        match kind {
            TimerKind::Restart if s.phase == Phase::Backoff => {
                self.states[i].restart_at = None;
                self.states[i].restarts += 1;
                self.set_phase(i, Phase::Stopped, now);
                self.kick(now, out);
            }
            TimerKind::StopTimeout if s.phase == Phase::Stopping && s.sigkill_sent => {
                // SIGKILL did not end it (uninterruptible sleep in the kernel): stop waiting, so a
                // shutdown still completes. Its exit, if it ever comes, is reaped as an orphan.
                let name = self.units[i].name.clone();
                out.push(Action::Log(
                    Level::Error,
                    format!("{name}: still alive {KILL_GRACE_MS} ms after SIGKILL; abandoning it"),
                ));
                let st = &mut self.states[i];
                st.pid = None;
                st.sigkill_sent = false;
                self.set_phase(i, Phase::Stopped, now);
                if self.shutting_down {
                    self.advance_shutdown(now, out);
                } else {
                    self.kick(now, out);
                }
            }
            TimerKind::StopTimeout if s.phase == Phase::Stopping => {
                if let Some(pid) = s.pid {
                    out.push(Action::Log(
                        Level::Warn,
                        format!(
                            "{}: did not stop in {} ms, killing",
                            self.units[i].name, self.units[i].stop_timeout_ms
                        ),
                    ));
                    out.push(Action::Kill {
                        unit: i,
                        pid,
                        signal: libc::SIGKILL,
                    });
                    self.states[i].sigkill_sent = true;
                    out.push(Action::set(
                        i,
                        TimerKind::StopTimeout,
                        now.mono.saturating_add(KILL_GRACE_MS),
                    ));
                }
            }
            TimerKind::ReadyTimeout if s.phase == Phase::Starting => {
                if let Some(pid) = s.pid {
                    out.push(Action::Log(
                        Level::Warn,
                        format!(
                            "{}: not ready after {} ms, killing",
                            self.units[i].name, self.units[i].ready_timeout_ms
                        ),
                    ));
                    self.states[i].ready_timed_out = true;
                    out.push(Action::Kill {
                        unit: i,
                        pid,
                        signal: libc::SIGKILL,
                    });
                }
            }
            TimerKind::Stable if s.phase == Phase::Running && s.attempts != 0 => {
                self.states[i].attempts = 0;
                out.push(Action::Log(
                    Level::Info,
                    format!("{}: stable, failure count cleared", self.units[i].name),
                ));
                out.push(Action::Persist);
            }
            // A timer for a phase the unit has left: stale, ignore.
            _ => {}
        }
    }

    fn enter_safe_mode(&mut self, reason: &str, now: Now, out: &mut Vec<Action>) {
        if self.mode == Mode::Safe || self.shutting_down {
            return;
        }
        self.mode = Mode::Safe;
        out.push(Action::Alert(format!("entering safe mode: {reason}")));
        for i in 0..self.units.len() {
            if !self.allowed(i) {
                let s = &mut self.states[i];
                s.wanted = false;
                s.restart_after_stop = false;
                self.begin_stop(i, now, out);
            }
        }
        for i in self.start_order.clone() {
            if self.allowed(i) && self.units[i].enabled && self.states[i].phase != Phase::Failed {
                self.want(i);
            }
        }
        out.push(Action::Persist);
        self.kick(now, out);
    }

    /// Shutdown: stop each unit once all it must wait for are down; report when all are.
    fn advance_shutdown(&mut self, now: Now, out: &mut Vec<Action>) {
        for i in 0..self.units.len() {
            let ph = self.states[i].phase;
            if !matches!(ph, Phase::Starting | Phase::Running) {
                continue;
            }
            if self.stop_wait[i].iter().all(|&w| !self.states[w].is_up()) {
                self.begin_stop(i, now, out);
            }
        }
        if !self.down_reported && self.states.iter().all(|s| !s.is_up()) {
            self.down_reported = true;
            out.push(Action::Log(
                Level::Info,
                "shutdown: all units stopped".into(),
            ));
            out.push(Action::UnitsDown);
        }
    }
    /// Replace the unit set (reload). Returns the new supervisor and what changed. Unchanged
    /// units keep their state untouched; changed ones keep their state and counters under the
    /// new definition (the caller restarts those that are up); removed ones are returned with
    /// their pid for the caller to stop.
    pub fn reloaded(&self, new_units: Vec<Unit>) -> (Supervisor, ReloadPlan) {
        let mut next = Supervisor::new(new_units, self.auto_recovery, self.max_running);
        next.mode = self.mode;
        next.shutting_down = self.shutting_down;
        next.crashes = self.crashes.clone();
        let mut plan = ReloadPlan {
            remap: vec![None; self.units.len()],
            ..Default::default()
        };
        for (old, u) in self.units.iter().enumerate() {
            match next.find(&u.name) {
                Some(new) => {
                    plan.remap[old] = Some(new);
                    next.states[new] = self.states[old].clone();
                    if next.units[new] == *u {
                        plan.unchanged.push(new);
                    } else {
                        plan.changed.push(new);
                    }
                }
                None => plan.removed.push(Removed {
                    name: u.name.clone(),
                    pid: self.states[old].pid,
                    stop_signal: u.stop_signal,
                    stop_timeout_ms: u.stop_timeout_ms,
                }),
            }
        }
        for (i, u) in next.units.iter().enumerate() {
            if self.find(&u.name).is_none() {
                plan.added.push(i);
            }
        }
        (next, plan)
    }

    /// Overwrite the state of unit `i` (resume after re-exec).
    pub fn restore_state(&mut self, i: usize, st: UnitState) {
        self.states[i] = st;
    }

    /// Start wanted units whose dependencies are up (after a resume or reload).
    pub fn kick_now(&mut self, now: Now) -> Vec<Action> {
        let mut out = Vec::new();
        self.kick(now, &mut out);
        out
    }
}

/// A unit dropped by a reload.
#[derive(Debug, Clone, PartialEq)]
pub struct Removed {
    pub name: String,
    pub pid: Option<i32>,
    pub stop_signal: i32,
    pub stop_timeout_ms: u64,
}

/// What a reload changed; indices are into the new supervisor.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReloadPlan {
    /// Old index → new index.
    pub remap: Vec<Option<usize>>,
    pub added: Vec<usize>,
    pub changed: Vec<usize>,
    pub unchanged: Vec<usize>,
    pub removed: Vec<Removed>,
}

/// Topological order over `edges[u]` = units that must come before `u`; among ready units the
/// most important priority first (or the least important, with `least_first`), then by name.
fn topo_order(units: &[Unit], edges: &[Vec<usize>], least_first: bool) -> Vec<usize> {
    let n = units.len();
    let mut indeg: Vec<usize> = edges.iter().map(|e| e.len()).collect();
    let mut after_me = vec![Vec::new(); n];
    for (u, es) in edges.iter().enumerate() {
        for &e in es {
            after_me[e].push(u);
        }
    }
    let key = |u: usize| -> (Priority, &str) { (units[u].priority, units[u].name.as_str()) };
    let mut ready: Vec<usize> = (0..n).filter(|&u| indeg[u] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while !ready.is_empty() {
        ready.sort_by(|&a, &b| {
            let (pa, na) = key(a);
            let (pb, nb) = key(b);
            let p = if least_first {
                pb.cmp(&pa)
            } else {
                pa.cmp(&pb)
            };
            p.then(na.cmp(nb))
        });
        let u = ready.remove(0);
        order.push(u);
        for &v in &after_me[u] {
            indeg[v] -= 1;
            if indeg[v] == 0 {
                ready.push(v);
            }
        }
    }
    // Cycles were rejected at load time; keep any leftovers rather than lose units.
    for u in 0..n {
        if !order.contains(&u) {
            order.push(u);
        }
    }
    order
}

#[cfg(test)]
mod tests;
