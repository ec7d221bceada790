//! Harness shared by the PID-namespace integration tests (`ns_core`, `ns_control`): the
//! root/`unshare` check and the lock that serialises the tests, per-test temp dirs, tau-init
//! as PID 1 of a fresh namespace (`unshare --pid --fork --mount-proc`), and `/proc` helpers.
//!
//! Each test binary uses its own subset, hence `dead_code` is allowed here. What only one file
//! needs (its `tau.toml`, how its tau-init is started and shut down, ...) stays in that file.

#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub const TAU_INIT: &str = env!("CARGO_BIN_EXE_tau-init");

// ---------------------------------------------------------------------------------------------
// Environment checks
// ---------------------------------------------------------------------------------------------

/// Why namespace tests cannot run here, if they cannot.
pub fn ns_unavailable() -> Option<String> {
    static PROBE: OnceLock<Option<String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            if !nix::unistd::geteuid().is_root() {
                return Some("not running as root".into());
            }
            match Command::new("unshare")
                .args(["--pid", "--fork", "--mount-proc", "/bin/true"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
            {
                Ok(s) if s.success() => None,
                Ok(s) => Some(format!(
                    "`unshare --pid --fork --mount-proc /bin/true` failed ({s})"
                )),
                Err(e) => Some(format!("cannot run `unshare`: {e}")),
            }
        })
        .clone()
}

/// The lock that serialises the tests of one test binary (tau-init instances and timings).
pub fn lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The lock that serialises namespace tests, or None (after printing why) to skip.
pub fn ns_guard(test: &str) -> Option<MutexGuard<'static, ()>> {
    if let Some(why) = ns_unavailable() {
        eprintln!("SKIP {test}: {why}");
        return None;
    }
    Some(lock())
}

/// `let _g = ns_test_guard!("test_name");` takes the lock, or prints `SKIP` and returns.
macro_rules! ns_test_guard {
    ($name:expr) => {
        match $crate::common::ns_guard($name) {
            Some(g) => g,
            None => return,
        }
    };
}
pub(crate) use ns_test_guard;

// ---------------------------------------------------------------------------------------------
// Temp dirs
// ---------------------------------------------------------------------------------------------

/// A fresh directory per test, with `units/` in it. Removed on drop unless the test failed or
/// the environment variable `keep_var` is set. Each test file adds its own methods (its
/// `tau.toml`, its unit writer, ...) in an `impl TestDir` block of its own.
pub struct TestDir {
    pub path: PathBuf,
    keep_var: &'static str,
}

impl TestDir {
    /// `<tmp>/<prefix>-<name>-<pid>-<n>-<nanos>`, with `units/` created.
    pub fn create(prefix: &str, name: &str, keep_var: &'static str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "{prefix}-{name}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let s = path.to_str().expect("utf-8 temp dir");
        assert!(
            !s.contains(['"', '\\', '\'', ' ']),
            "temp dir {s} needs quoting"
        );
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(path.join("units")).unwrap();
        Self { path, keep_var }
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if thread::panicking() || std::env::var_os(self.keep_var).is_some() {
            eprintln!("kept test dir {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Host-side view of processes
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Proc {
    pub pid: i32,
    pub ppid: i32,
    pub state: char,
    pub comm: String,
}

/// `comm` and the fields from the 3rd on of `/proc/<pid>/stat` (state is index 0 here).
pub fn parse_stat(pid: i32) -> Option<(String, Vec<String>)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let comm = stat[open + 1..close].to_string();
    Some((
        comm,
        stat[close + 1..]
            .split_whitespace()
            .map(str::to_string)
            .collect(),
    ))
}

/// Every process on the host (those that vanish while scanning are skipped).
pub fn host_procs() -> Vec<Proc> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut v = Vec::new();
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Some((comm, rest)) = parse_stat(pid) else {
            continue;
        };
        let state = rest.first().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid = rest.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        v.push(Proc {
            pid,
            ppid,
            state,
            comm,
        });
    }
    v
}

pub fn pid_ns_link(pid: i32) -> Option<String> {
    fs::read_link(format!("/proc/{pid}/ns/pid"))
        .ok()
        .map(|p| p.display().to_string())
}

/// Host's monotonic (boot) clock in seconds, the clock units read from `/proc/uptime`.
pub fn uptime() -> f64 {
    fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|t| t.parse().ok()))
        .unwrap_or(0.0)
}

pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// tau-init in a PID namespace
// ---------------------------------------------------------------------------------------------

/// `unshare --pid --fork --mount-proc --kill-child tau-init --config <dir>/tau.toml
/// --units <dir>/units --run-dir <run_arg>`, for [`NsInit::spawn`] (a test file may add to it).
pub fn unshare_tau_init(dir: &TestDir, run_arg: &Path) -> Command {
    let mut c = Command::new("unshare");
    c.args(["--pid", "--fork", "--mount-proc", "--kill-child"])
        .arg(TAU_INIT)
        .arg("--config")
        .arg(dir.p("tau.toml"))
        .arg("--units")
        .arg(dir.p("units"))
        .arg("--run-dir")
        .arg(run_arg);
    c
}

/// The last `max` of `lines`, framed for a failure message.
pub fn log_tail(lines: &[&str], max: usize) -> String {
    let skip = lines.len().saturating_sub(max);
    format!(
        "\n--- tau-init stderr (last {} lines) ---\n{}\n---",
        lines.len() - skip,
        lines[skip..].join("\n")
    )
}

/// tau-init under unshare, with stderr collected by a thread. Dropping it (unless it has been
/// seen to exit) SIGKILLs tau-init (the kernel then kills the whole namespace) and unshare,
/// and waits for both.
pub struct NsInit {
    pub child: Child,
    /// Host pid of tau-init (PID 1 inside).
    pub pid1: i32,
    /// `/proc/<pid1>/ns/pid` link, to recognise members of the namespace.
    pub ns_link: String,
    /// That namespace file, held open so that its inode number cannot be reused by another
    /// namespace while we look for leftovers.
    pub ns_file: Option<File>,
    /// unshare's exit status, once [`NsInit::wait_exit`] has seen it.
    pub status: Option<ExitStatus>,
    log: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
    /// Formats the log for failure messages ([`NsInit::ctx`]).
    render: fn(&str) -> String,
}

impl NsInit {
    /// Spawns `cmd` (see [`unshare_tau_init`]) with stdin and stdout null and stderr collected,
    /// finds tau-init's host pid and waits until it has begun starting units. `render` turns
    /// the log into the context of failure messages.
    pub fn spawn(mut cmd: Command, render: fn(&str) -> String) -> NsInit {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn unshare");
        let mut err = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&log);
        let reader = thread::spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                match err.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => sink
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push_str(&String::from_utf8_lossy(&buf[..n])),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        });
        let mut ns = NsInit {
            child,
            pid1: 0,
            ns_link: String::new(),
            ns_file: None,
            status: None,
            log,
            reader: Some(reader),
            render,
        };
        let upid = ns.child.id() as i32;
        let own = pid_ns_link(std::process::id() as i32);
        let found = wait_until(Duration::from_secs(10), || {
            let Some(p) = host_procs().into_iter().find(|p| p.ppid == upid) else {
                return false;
            };
            match pid_ns_link(p.pid) {
                Some(link) if Some(&link) != own.as_ref() => {
                    ns.pid1 = p.pid;
                    ns.ns_link = link;
                    ns.ns_file = File::open(format!("/proc/{}/ns/pid", p.pid)).ok();
                    true
                }
                _ => false,
            }
        });
        assert!(
            found,
            "tau-init did not appear as the child of unshare{}",
            ns.ctx()
        );
        ns.expect_log("units in normal mode", Duration::from_secs(10));
        ns
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The log, as the test file renders it for failure messages.
    pub fn ctx(&self) -> String {
        (self.render)(&self.log())
    }

    pub fn expect_log(&self, pat: &str, timeout: Duration) {
        let ok = wait_until(timeout, || self.log().contains(pat));
        assert!(ok, "no `{pat}` in the log within {timeout:?}{}", self.ctx());
    }

    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid1), sig)
            .unwrap_or_else(|e| panic!("kill({}, {sig}): {e}", self.pid1));
    }

    /// Waits for unshare to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + timeout;
        while self.status.is_none() {
            if let Ok(Some(s)) = self.child.try_wait() {
                self.status = Some(s);
                break;
            }
            if Instant::now() >= end {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        self.status
    }

    pub fn join_reader(&mut self) {
        if let Some(r) = self.reader.take() {
            // Every writer is in the namespace, which dies with PID 1: EOF comes promptly.
            let _ = wait_until(Duration::from_secs(5), || r.is_finished());
            if r.is_finished() {
                let _ = r.join();
            }
        }
    }
}

impl Drop for NsInit {
    fn drop(&mut self) {
        if self.status.is_none() {
            if self.pid1 > 0 {
                let _ = kill(Pid::from_raw(self.pid1), Signal::SIGKILL);
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.join_reader();
    }
}
