//! The event loop: one thread, one `mio::Poll`, one deadline queue. It carries out the
//! supervisor's actions (spawn, signal, timers, persistence) and feeds it events (exits, readiness,
//! timers, signals). Order on each wake-up: signals, reaping, timers, readiness.

use std::collections::{HashMap, VecDeque};
use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::Duration;

use libc::{SIGCHLD, SIGHUP, SIGINT, SIGPWR, SIGTERM, SIGUSR1, SIGUSR2};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use signal_hook_mio::v1_0::Signals;

use crate::cgroup::Cgroups;
use crate::config::model::{Config, Unit};
use crate::log;
use crate::notify::NotifySocket;
use crate::persist;
use crate::supervisor::{Action, Event, ExitInfo, Level, Mode, Now, Supervisor, TimerKind};

mod commands;
mod reexec;

pub use reexec::ResumeState;

const SIGNALS: Token = Token(0);
const NOTIFY: Token = Token(1);
const CONTROL: Token = Token(2);
/// Reply FIFOs waiting to be written get tokens from here up.
const REPLY_BASE: usize = 1 << 20;

/// Most children reaped per wake-up before other events get a turn.
pub const REAP_BATCH: usize = 1024;

/// Timer keys of the one deadline queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    Unit(usize, TimerKind),
    /// Shutdown: SIGKILL everything still alive.
    FinalKill,
    /// Shutdown: stop waiting for the last processes.
    FinalDeadline,
    /// A reply to a slow client is dropped.
    Reply(u64),
    /// A process of a unit removed by reload gets SIGKILL.
    RemovedKill(i32),
}

/// How the system goes down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    Poweroff,
    Reboot,
}

impl Shutdown {
    fn as_str(self) -> &'static str {
        match self {
            Shutdown::Poweroff => "poweroff",
            Shutdown::Reboot => "reboot",
        }
    }
}

/// Where things are and how tau-init runs, resolved from flags, kernel command line and config.
#[derive(Debug, Clone)]
pub struct Setup {
    pub config: Config,
    /// The units to supervise (moved into the supervisor by [`Runtime::new`]).
    pub units: Vec<Unit>,
    pub run_dir: PathBuf,
    pub pid1: bool,
    /// Started by a kernel (not in a container): the API mounts, modules and the persistent
    /// disk are ours.
    pub booted: bool,
    pub mode: Mode,
    /// Persistent disk mounted at `[system] persistent_mount` (unmounted at shutdown).
    pub persistent_mounted: bool,
    /// Units directory (re-read by `reload`).
    pub units_dir: PathBuf,
    /// The effective config with the source of each value (`taucli config`).
    pub config_view: serde_json::Value,
    /// Arguments to exec again on `reexec`.
    pub argv: Vec<std::ffi::OsString>,
    /// State handed over by the previous instance (re-exec).
    pub resume: Option<ResumeState>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Final {
    /// Units are being stopped by the supervisor.
    Units,
    /// SIGTERM sent to all remaining processes.
    Term,
    /// SIGKILL sent.
    Kill,
    Done,
}

/// The running supervisor and everything the loop owns.
pub struct Runtime {
    setup: Setup,
    pub sup: Supervisor,
    timers: crate::event::timers::Timers<Key>,
    pids: HashMap<i32, usize>,
    poll: Poll,
    signals: Signals,
    notify: Option<NotifySocket>,
    cgroups: Option<Cgroups>,
    state_dir: PathBuf,
    dirty: bool,
    reap_backlog: bool,
    shutdown: Option<(Shutdown, Final)>,
    control: Option<crate::control::server::ControlServer>,
    control_backlog: bool,
    replies: HashMap<u64, crate::control::server::Pending>,
    next_reply: u64,
    /// After the current reply is sent: power off, reboot or re-exec.
    after_reply: Option<commands::After>,
    audit_log: PathBuf,
    /// Orphans (not unit main processes) reaped since start.
    pub orphans_reaped: u64,
    /// Events whose handling panicked (caught, logged).
    pub handler_panics: u64,
    /// Took over from a previous instance (re-exec): no boot, units are already up.
    resumed: bool,
}

/// The emergency shell added in PID 1 when no unit provides a safe-mode console shell.
pub fn builtin_shell() -> Unit {
    use crate::config::model::{Priority, Ready, Recovery, Strategy};
    Unit {
        name: "emergency-shell".into(),
        path: PathBuf::from("<built-in>"),
        description: "root shell on the console in safe mode".into(),
        exec: vec!["/bin/sh".into()],
        env: Default::default(),
        working_dir: Some(PathBuf::from("/")),
        uid: None,
        gid: None,
        priority: Priority::Critical,
        critical: false,
        after: vec![],
        requires: vec![],
        safe_mode: true,
        safe_mode_only: true,
        enabled: true,
        stop_signal: libc::SIGHUP,
        stop_timeout_ms: 2000,
        ready: Ready::None,
        ready_timeout_ms: 0,
        console: true,
        memory_limit_mb: 0,
        cpu_limit_percent: 0.0,
        recovery: Recovery {
            strategy: Strategy::RestartWithDelay,
            delay_ms: 1000,
            backoff_initial_ms: 0,
            backoff_max_ms: 0,
            backoff_factor: 1.0,
            max_attempts: 3,
            reset_after_ms: 60_000,
        },
    }
}

/// The unit set tau-init supervises: the valid units of `dir` and, when a kernel booted us, the
/// built-in emergency shell. Boot, reload and re-exec all build it through here.
pub fn load_unit_set(
    dir: &Path,
    cfg: &Config,
    booted: bool,
) -> (Vec<Unit>, Vec<crate::config::Diagnostic>) {
    let (mut units, diags) = crate::config::load_units(dir, cfg);
    if booted {
        add_builtin_shell(&mut units);
    }
    (units, diags)
}

/// Add the built-in emergency shell unless a unit already gives safe mode a console shell (or
/// uses its name).
fn add_builtin_shell(units: &mut Vec<Unit>) {
    let shell = builtin_shell();
    if units.iter().any(|u| u.safe_mode_only && u.console) {
        return;
    }
    if units.iter().any(|u| u.name == shell.name) {
        log::warn(&format!(
            "unit {} is not a safe-mode console shell; safe mode has no shell",
            shell.name
        ));
        return;
    }
    units.push(shell);
}

fn now() -> Now {
    Now {
        mono: crate::sys::monotonic_ms(),
        wall: crate::sys::wall_ms(),
    }
}

impl Runtime {
    /// Set up signals, the notify socket, cgroups and durable state.
    pub fn new(mut setup: Setup) -> std::io::Result<Self> {
        // The supervisor owns the units from here on.
        let units = std::mem::take(&mut setup.units);
        let cfg = &setup.config;
        let max = if cfg.process_management.enabled {
            cfg.process_management.max_concurrent_processes as usize
        } else {
            usize::MAX
        };
        let mut sup = Supervisor::new(
            units,
            cfg.crash_recovery.enabled && cfg.crash_recovery.auto_recovery,
            max,
        );
        let poll = Poll::new()?;
        let mut signals =
            Signals::new([SIGCHLD, SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2, SIGPWR])?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        // A write to a client that went away must be an EPIPE error, not a fatal signal.
        crate::sys::ignore_signal(libc::SIGPIPE);
        if let Err(e) = std::fs::create_dir_all(&setup.run_dir) {
            log::error(&format!("mkdir {}: {e}", setup.run_dir.display()));
        }
        // Descriptors handed over across re-exec (kept open, so nothing queued is lost).
        let handed = setup.resume.as_ref();
        let inherited_notify = handed
            .and_then(|r| r.notify_fd)
            .and_then(crate::sys::adopt_fd);
        let inherited_control = handed
            .and_then(|r| r.control_fd.map(|fd| (fd, r.control_pending.clone())))
            .and_then(|(fd, pending)| crate::sys::adopt_fd(fd).map(|fd| (fd, pending)));
        let notify = match NotifySocket::bind(&setup.run_dir.join("notify"), inherited_notify) {
            Ok(n) => {
                poll.registry()
                    .register(&mut SourceFd(&n.fd()), NOTIFY, Interest::READABLE)?;
                Some(n)
            }
            Err(e) => {
                log::error(&format!(
                    "notify socket {}: {e}; ready=notify units will time out",
                    setup.run_dir.join("notify").display()
                ));
                None
            }
        };
        let cgroups = if cfg.process_management.enabled && cfg.process_management.process_isolation
        {
            let max_pids =
                u64::from(cfg.process_management.max_concurrent_processes).saturating_mul(16);
            match Cgroups::setup(
                &cfg.system.cgroup_root,
                max_pids,
                cfg.process_management.resource_pooling,
            ) {
                Ok((cg, warnings)) => {
                    for w in warnings {
                        log::warn(&format!("cgroup: {w}"));
                    }
                    log::info(&format!(
                        "cgroup v2 pools ready, controllers: {}",
                        cg.enabled.join(" ")
                    ));
                    Some(cg)
                }
                Err(e) => {
                    log::warn(&format!(
                        "cgroups unavailable ({e}); units run without isolation"
                    ));
                    None
                }
            }
        } else {
            None
        };
        let state_dir = cfg.system.state_dir.clone();
        match persist::load(&state_dir) {
            persist::Loaded::Missing => {
                log::info(&format!("no saved state in {}", state_dir.display()))
            }
            persist::Loaded::Ok(d) => {
                d.apply(&mut sup);
                log::info(&format!(
                    "restored state: {} crash records",
                    sup.crashes.len()
                ));
            }
            persist::Loaded::SetAside { reason, moved_to } => log::error(&format!(
                "saved state is corrupt ({reason}); set aside{}; starting with empty history",
                moved_to
                    .map(|p| format!(" as {}", p.display()))
                    .unwrap_or_default()
            )),
        }
        let control_gid = match cfg.system.control_group.as_str() {
            "" => None,
            g => {
                let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
                let gid = g
                    .parse()
                    .ok()
                    .or_else(|| crate::config::lookup_group(&groups, g));
                if gid.is_none() {
                    log::warn(&format!(
                        "control_group {g}: no such group; control FIFO stays root-only"
                    ));
                }
                gid
            }
        };
        let control = match crate::control::server::ControlServer::open(
            &setup.run_dir,
            control_gid,
            inherited_control,
        ) {
            Ok(c) => {
                poll.registry()
                    .register(&mut SourceFd(&c.fd()), CONTROL, Interest::READABLE)?;
                Some(c)
            }
            Err(e) => {
                log::error(&format!(
                    "control FIFO: {e}; taucli will not reach tau-init"
                ));
                None
            }
        };
        let audit_log = cfg.system.audit_log.clone();
        let mut rt = Self {
            setup,
            sup,
            timers: Default::default(),
            pids: HashMap::new(),
            poll,
            signals,
            notify,
            cgroups,
            state_dir,
            dirty: false,
            reap_backlog: false,
            shutdown: None,
            control,
            control_backlog: false,
            replies: HashMap::new(),
            next_reply: 0,
            after_reply: None,
            audit_log,
            orphans_reaped: 0,
            handler_panics: 0,
            resumed: false,
        };
        if let Some(r) = rt.setup.resume.take() {
            rt.resume(r);
        }
        Ok(rt)
    }

    /// Run until shutdown completes. Returns how the system should go down.
    pub fn run(&mut self) -> Shutdown {
        let mode = self.setup.mode;
        if self.resumed {
            log::info(&format!(
                "resumed after re-exec with {} units",
                self.sup.units.len()
            ));
            // Units that died while we were exec'ing: their SIGCHLD went to the old image.
            self.reap();
            let actions = self.sup.kick_now(now());
            self.carry_out(actions);
        } else {
            let m = if mode == Mode::Safe { "safe" } else { "normal" };
            log::info(&format!(
                "starting {} units in {m} mode",
                self.sup.units.len()
            ));
            self.dispatch(Event::Boot { mode });
        }
        let mut events = Events::with_capacity(64);
        loop {
            self.save_if_dirty();
            if let Some((kind, Final::Done)) = self.shutdown {
                return kind;
            }
            let timeout = if self.reap_backlog || self.control_backlog {
                Some(Duration::ZERO)
            } else {
                self.timers
                    .timeout_ms(crate::sys::monotonic_ms())
                    .map(Duration::from_millis)
            };
            if let Err(e) = self.poll.poll(&mut events, timeout)
                && e.kind() != std::io::ErrorKind::Interrupted
            {
                log::error(&format!("poll: {e}"));
                std::thread::sleep(Duration::from_millis(100));
            }
            let mut notify_ready = false;
            let mut control_ready = self.control_backlog;
            let mut writable = Vec::new();
            for ev in events.iter() {
                match ev.token() {
                    SIGNALS => {}
                    NOTIFY => notify_ready = true,
                    CONTROL => control_ready = true,
                    Token(t) if t >= REPLY_BASE => writable.push((t - REPLY_BASE) as u64),
                    t => log::debug(&format!("spurious event for token {}", t.0)),
                }
            }
            self.guarded("signals", |rt| rt.on_signals());
            self.guarded("reap", |rt| rt.reap());
            self.guarded("timers", |rt| rt.fire_timers());
            if notify_ready {
                self.guarded("notify", |rt| rt.on_notify());
            }
            for id in writable {
                self.guarded("reply", |rt| rt.flush_reply(id));
            }
            if control_ready {
                self.guarded("control", |rt| rt.on_control());
            }
            if let Some(after) = self.after_reply.take() {
                self.guarded("command", |rt| rt.after(after));
            }
        }
    }

    /// Run one handler; a panic in it is logged and counted, and the loop goes on.
    fn guarded(&mut self, what: &str, f: impl FnOnce(&mut Self)) {
        if catch_unwind(AssertUnwindSafe(|| f(self))).is_err() {
            self.handler_panics += 1;
            log::error(&format!("internal error while handling {what}; continuing"));
        }
    }

    fn on_signals(&mut self) {
        let pending: Vec<i32> = self.signals.pending().collect();
        for sig in pending {
            match sig {
                SIGCHLD => {}
                SIGTERM | SIGUSR2 | SIGPWR => self.begin_shutdown(Shutdown::Poweroff),
                SIGINT => self.begin_shutdown(if self.setup.pid1 {
                    Shutdown::Reboot
                } else {
                    Shutdown::Poweroff
                }),
                SIGHUP | SIGUSR1 => log::info(&format!("signal {sig} received: no action")),
                other => log::debug(&format!("signal {other} ignored")),
            }
        }
    }

    /// Begin an orderly shutdown (a second request only changes the final action).
    pub fn begin_shutdown(&mut self, kind: Shutdown) {
        match self.shutdown {
            Some((_, phase)) => {
                self.shutdown = Some((kind, phase));
                log::info(&format!(
                    "shutdown already in progress; will {}",
                    kind.as_str()
                ));
            }
            None => {
                log::info(&format!("shutdown requested: {}", kind.as_str()));
                self.shutdown = Some((kind, Final::Units));
                self.dispatch(Event::Shutdown);
            }
        }
    }

    fn reap(&mut self) {
        self.reap_backlog = false;
        for _ in 0..REAP_BATCH {
            match crate::sys::reap_one() {
                Ok(None) => return,
                Ok(Some((pid, Some(crate::sys::WaitResult::Exited(code))))) => {
                    self.child_exited(pid, ExitInfo::Exited { code })
                }
                Ok(Some((pid, Some(crate::sys::WaitResult::Signaled(signal, core_dumped))))) => {
                    self.child_exited(
                        pid,
                        ExitInfo::Signaled {
                            signal,
                            core_dumped,
                        },
                    )
                }
                Ok(Some((_, None))) => {}
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::ECHILD) => {
                    self.no_children_left();
                    return;
                }
                Err(e) => {
                    log::error(&format!("waitpid: {}", e.desc()));
                    return;
                }
            }
        }
        self.reap_backlog = true;
    }

    fn child_exited(&mut self, pid: i32, exit: ExitInfo) {
        match self.pids.remove(&pid) {
            // Only the unit's current main process speaks for it (not one it abandoned).
            Some(unit) if self.sup.states[unit].pid == Some(pid) => {
                self.cleanup_unit_processes(unit, pid);
                self.dispatch(Event::Exited { unit, exit });
            }
            _ => {
                // A unit removed by reload: clean up after it as after any unit, and its SIGKILL
                // timer is moot now.
                if self.timers.get(Key::RemovedKill(pid)).is_some() {
                    let _ = crate::sys::kill(-pid, libc::SIGKILL);
                }
                self.timers.cancel(Key::RemovedKill(pid));
                self.orphans_reaped += 1;
                if self.setup.config.process_management.auto_cleanup_zombies {
                    log::debug(&format!("reaped orphan {pid} ({exit})"));
                }
            }
        }
    }

    /// The main process is gone: kill whatever it left behind in its cgroup / process group.
    fn cleanup_unit_processes(&mut self, unit: usize, pid: i32) {
        let u = &self.sup.units[unit];
        if let Some(cg) = &self.cgroups
            && !cg.unit_pids(u.priority, &u.name).is_empty()
        {
            cg.kill_unit(u.priority, &u.name);
        }
        let _ = crate::sys::kill(-pid, libc::SIGKILL);
    }

    fn fire_timers(&mut self) {
        let mut n = 0;
        while let Some(key) = self.timers.pop_due(crate::sys::monotonic_ms()) {
            match key {
                Key::Unit(unit, kind) => self.dispatch(Event::Timer { unit, kind }),
                Key::FinalKill => self.final_kill(),
                Key::FinalDeadline => {
                    log::warn("shutdown: processes still alive after SIGKILL; going down anyway");
                    self.finish();
                }
                Key::Reply(id) => self.drop_reply(id, "reader too slow"),
                Key::RemovedKill(pid) => {
                    let _ = crate::sys::kill(-pid, libc::SIGKILL);
                    let _ = crate::sys::kill(pid, libc::SIGKILL);
                }
            }
            n += 1;
            if n >= 4096 {
                break;
            }
        }
    }

    fn on_notify(&mut self) {
        let Some(sock) = &self.notify else { return };
        for (pid, notice) in sock.drain() {
            match self.pids.get(&pid) {
                Some(&unit) => {
                    if notice.ready {
                        self.dispatch(Event::Ready(unit));
                    }
                    if let Some(s) = notice.status {
                        log::log(
                            Level::Debug,
                            Some(&self.sup.units[unit].name),
                            &format!("status: {s}"),
                        );
                    }
                }
                None => log::debug(&format!(
                    "notify message from pid {pid}, not a unit's main process: ignored"
                )),
            }
        }
    }

    /// Feed an event to the supervisor and carry out the actions it answers with.
    pub fn dispatch(&mut self, ev: Event) {
        let actions = self.sup.handle(ev, now());
        self.carry_out(actions);
    }

    /// Carry out actions (and the actions their results lead to).
    fn carry_out(&mut self, actions: Vec<Action>) {
        let mut queue: VecDeque<Action> = actions.into();
        while let Some(a) = queue.pop_front() {
            match a {
                Action::Spawn(i) => {
                    // An earlier action of this batch may have stopped the unit meanwhile (e.g.
                    // safe mode): a spawn asked for before that is void.
                    let st = &self.sup.states[i];
                    if st.phase != crate::supervisor::Phase::Starting || st.pid.is_some() {
                        log::debug(&format!(
                            "{}: spawn no longer wanted",
                            self.sup.units[i].name
                        ));
                        continue;
                    }
                    let ev = self.spawn_unit(i);
                    queue.extend(self.sup.handle(ev, now()));
                }
                Action::Kill { unit, pid, signal } => self.kill_unit(unit, pid, signal),
                Action::SetTimer { unit, kind, at } => self.timers.set(Key::Unit(unit, kind), at),
                Action::CancelTimer { unit, kind } => self.timers.cancel(Key::Unit(unit, kind)),
                Action::Crash(rec) => log::log(
                    Level::Warn,
                    Some(&rec.unit),
                    &format!(
                        "{}: crash recorded: {} after {} ms up, attempt {}, action {}",
                        rec.unit, rec.exit, rec.uptime_ms, rec.attempt, rec.action
                    ),
                ),
                Action::Alert(msg) => log::log(Level::Error, None, &format!("ALERT: {msg}")),
                Action::Log(level, msg) => log::log(level, None, &msg),
                Action::Persist => self.dirty = true,
                Action::UnitsDown => self.units_down(),
            }
        }
    }

    fn save_if_dirty(&mut self) {
        if !std::mem::take(&mut self.dirty) {
            return;
        }
        let d = persist::Durable::from_supervisor(&self.sup);
        if let Err(e) = persist::save(&self.state_dir, &d) {
            log::warn(&format!("saving state: {e}"));
        }
    }

    fn kill_unit(&mut self, unit: usize, pid: i32, signal: i32) {
        let u = &self.sup.units[unit];
        if signal == libc::SIGKILL
            && let Some(cg) = &self.cgroups
        {
            cg.kill_unit(u.priority, &u.name);
        }
        // The unit leads its own session and process group: signal all of it, unless it moved
        // itself to another group (then only the main process).
        let target = match nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid))) {
            Ok(g) if g.as_raw() == pid => -pid,
            _ => pid,
        };
        if let Err(e) = crate::sys::kill(target, signal) {
            log::warn(&format!("{}: kill {target} {signal}: {}", u.name, e.desc()));
        }
    }

    /// Session state directory of a unit (created 0700, owned by the unit's user).
    fn state_dir_for(&self, u: &Unit) -> PathBuf {
        let cr = &self.setup.config.crash_recovery;
        if cr.save_session_state {
            cr.session_state_path.join(&u.name)
        } else {
            self.setup.run_dir.join("state").join(&u.name)
        }
    }

    fn spawn_unit(&mut self, i: usize) -> Event {
        match self.try_spawn(i) {
            Ok(pid) => {
                self.pids.insert(pid, i);
                Event::Spawned { unit: i, pid }
            }
            Err((errno, message)) => Event::SpawnFailed {
                unit: i,
                errno,
                message,
            },
        }
    }

    fn try_spawn(&mut self, i: usize) -> Result<i32, (i32, String)> {
        let u = self.sup.units[i].clone();
        let st = &self.sup.states[i];
        let state_dir = self.state_dir_for(&u);
        prepare_state_dir(&state_dir, u.uid, u.gid).map_err(|e| (libc::EIO, e))?;
        let mut env: Vec<(String, String)> = vec![
            (
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            ),
            ("HOME".into(), "/".into()),
            ("TERM".into(), "linux".into()),
        ];
        for (k, v) in &u.env {
            env.retain(|(ek, _)| ek != k);
            env.push((k.clone(), v.clone()));
        }
        env.push(("TAU_UNIT".into(), u.name.clone()));
        env.push(("TAU_STATE_DIR".into(), state_dir.display().to_string()));
        env.push(("TAU_RESTART_COUNT".into(), st.restarts.to_string()));
        env.push((
            "TAU_LAST_EXIT".into(),
            st.last_exit
                .map(|e| e.to_string())
                .unwrap_or_else(|| "none".into()),
        ));
        if let Some(n) = &self.notify {
            env.push(("NOTIFY_SOCKET".into(), n.path.display().to_string()));
        }
        let bad = |what: &str| (libc::EINVAL, format!("{what} contains a NUL byte"));
        let argv: Vec<CString> = u
            .exec
            .iter()
            .map(|a| CString::new(a.as_str()).map_err(|_| bad("exec")))
            .collect::<Result<_, _>>()?;
        let envp: Vec<CString> = env
            .iter()
            .map(|(k, v)| CString::new(format!("{k}={v}")).map_err(|_| bad("env")))
            .collect::<Result<_, _>>()?;
        let path = argv.first().cloned().ok_or_else(|| bad("exec"))?;
        let cwd = match &u.working_dir {
            Some(d) => Some(
                CString::new(d.as_os_str().as_encoded_bytes()).map_err(|_| bad("working_dir"))?,
            ),
            None => None,
        };
        let cgroup_procs = match &self.cgroups {
            Some(cg) => {
                match cg.prepare_unit(u.priority, &u.name, u.memory_limit_mb, u.cpu_limit_percent) {
                    Ok((fd, warnings)) => {
                        for w in warnings {
                            log::warn(&format!("{}: cgroup: {w}", u.name));
                        }
                        Some(fd)
                    }
                    Err(e) => {
                        log::warn(&format!(
                            "{}: cgroup: {e}; running without its own cgroup",
                            u.name
                        ));
                        None
                    }
                }
            }
            None => None,
        };
        let (stdin, stdout, stderr) = if u.console {
            open_console()
        } else {
            (None, None, None)
        };
        let spec = crate::sys::SpawnSpec {
            path,
            argv,
            envp,
            cwd,
            uid: u.uid,
            gid: u.gid,
            cgroup_procs,
            stdin,
            stdout,
            stderr,
            controlling_tty: u.console,
        };
        crate::sys::spawn(&spec)
            .map_err(|e| (e.errno as i32, format!("cannot start {}: {e}", u.exec[0])))
    }

    fn units_down(&mut self) {
        let Some((kind, _)) = self.shutdown else {
            return;
        };
        if !self.setup.pid1 {
            self.shutdown = Some((kind, Final::Done));
            return;
        }
        log::info("shutdown: sending SIGTERM to all remaining processes");
        let _ = crate::sys::kill(-1, libc::SIGTERM);
        self.shutdown = Some((kind, Final::Term));
        let t = self.setup.config.system.shutdown_kill_timeout_ms;
        self.timers
            .set(Key::FinalKill, crate::sys::monotonic_ms().saturating_add(t));
        self.reap();
    }

    fn final_kill(&mut self) {
        if let Some((kind, Final::Term)) = self.shutdown {
            log::info("shutdown: sending SIGKILL to all remaining processes");
            let _ = crate::sys::kill(-1, libc::SIGKILL);
            self.shutdown = Some((kind, Final::Kill));
            self.timers.set(
                Key::FinalDeadline,
                crate::sys::monotonic_ms().saturating_add(2000),
            );
            self.reap();
        }
    }

    fn no_children_left(&mut self) {
        if let Some((_, Final::Term | Final::Kill)) = self.shutdown {
            self.finish();
        }
    }

    fn finish(&mut self) {
        if let Some((kind, phase)) = self.shutdown
            && phase != Final::Done
        {
            self.timers.cancel(Key::FinalKill);
            self.timers.cancel(Key::FinalDeadline);
            self.shutdown = Some((kind, Final::Done));
        }
    }

    /// Final steps as PID 1 after the loop: save, sync, unmount, reboot(2). Never returns.
    pub fn power_off(mut self, kind: Shutdown) -> ! {
        self.dirty = true;
        self.save_if_dirty();
        crate::sys::sync();
        if self.setup.persistent_mounted {
            crate::boot::unmount_persistent(&self.setup.config.system.persistent_mount);
        }
        crate::sys::sync();
        log::info(&format!("shutdown: {}", kind.as_str()));
        let how = match kind {
            Shutdown::Poweroff => nix::sys::reboot::RebootMode::RB_POWER_OFF,
            Shutdown::Reboot => nix::sys::reboot::RebootMode::RB_AUTOBOOT,
        };
        let Err(e) = nix::sys::reboot::reboot(how);
        log::error(&format!("reboot(2): {}; halting here", e.desc()));
        crate::sys::freeze()
    }

    /// Save durable state now (foreground exit).
    pub fn save_now(&mut self) {
        self.dirty = true;
        self.save_if_dirty();
    }
}

/// Create a unit's session state directory 0700 (owned by uid:gid when given).
pub fn prepare_state_dir(dir: &Path, uid: Option<u32>, gid: Option<u32>) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("session state dir {}: {e}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("chmod 0700 {}: {e}", dir.display()))?;
    if uid.is_some() || gid.is_some() {
        std::os::unix::fs::chown(dir, uid, gid)
            .map_err(|e| format!("chown {}: {e}", dir.display()))?;
    }
    Ok(())
}

/// The console for a unit with `console = true` (None when it cannot be opened).
fn open_console() -> (Option<OwnedFd>, Option<OwnedFd>, Option<OwnedFd>) {
    let open = || {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/console")
            .ok()
            .map(OwnedFd::from)
    };
    let Some(a) = open() else {
        return (None, None, None);
    };
    let b = a.try_clone().ok();
    let c = a.try_clone().ok();
    (Some(a), b, c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path, booted: bool) -> Vec<String> {
        let (units, diags) = load_unit_set(dir, &Config::default(), booted);
        assert!(diags.is_empty(), "{diags:?}");
        units.into_iter().map(|u| u.name).collect()
    }

    #[test]
    fn unit_set_gets_the_builtin_shell_only_when_booted_and_never_twice() {
        let dir = std::env::temp_dir().join(format!("tau-unitset-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("svc.toml"), "exec = [\"/bin/true\"]\n").unwrap();
        assert_eq!(names(&dir, false), vec!["svc"]);
        assert_eq!(names(&dir, true), vec!["svc", "emergency-shell"]);
        // A unit of that name that is not a console shell: no second one, no clash.
        std::fs::write(dir.join("emergency-shell.toml"), "exec = [\"/bin/true\"]\n").unwrap();
        assert_eq!(names(&dir, true), vec!["emergency-shell", "svc"]);
        // A unit that is the safe-mode console shell replaces the built-in one.
        std::fs::write(
            dir.join("emergency-shell.toml"),
            "exec = [\"/bin/true\"]\nsafe_mode_only = true\nconsole = true\n",
        )
        .unwrap();
        std::fs::write(dir.join("other.toml"), "exec = [\"/bin/true\"]\n").unwrap();
        assert_eq!(names(&dir, true), vec!["emergency-shell", "other", "svc"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
