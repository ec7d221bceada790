//! Live re-exec: serialize the supervisor's state, exec our own binary anew (possibly a newer
//! version at the same path), and pick up every running unit by pid without restarting it.

use std::ffi::CString;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Key, Runtime};
use crate::log;
use crate::supervisor::{CrashRecord, Mode, TimerKind, UnitState};

/// File in the run directory that carries the state across exec.
pub const RESUME_FILE: &str = "reexec-state.json";

/// Everything a new tau-init needs to carry on where the old one stopped.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResumeState {
    pub version: u32,
    pub mode: Mode,
    pub units: Vec<(String, UnitState)>,
    pub crashes: Vec<CrashRecord>,
    /// Unit timers as (unit, kind, monotonic deadline): CLOCK_MONOTONIC survives exec.
    pub timers: Vec<(String, TimerKind, u64)>,
    pub booted: bool,
    pub persistent_mounted: bool,
    pub orphans_reaped: u64,
    /// The control FIFO, kept open across exec, and the unfinished request line read from it.
    #[serde(default)]
    pub control_fd: Option<i32>,
    #[serde(default)]
    pub control_pending: Vec<u8>,
    /// The notify socket, kept open across exec.
    #[serde(default)]
    pub notify_fd: Option<i32>,
    /// Processes of units removed by reload, with their SIGKILL deadline.
    #[serde(default)]
    pub removed_kills: Vec<(i32, u64)>,
}

impl ResumeState {
    /// Read and remove the resume file.
    pub fn take(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let _ = std::fs::remove_file(path);
        let s: ResumeState =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if s.version != 1 {
            return Err(format!(
                "{}: unsupported version {}",
                path.display(),
                s.version
            ));
        }
        Ok(s)
    }
}

/// The path of our own binary: what /proc/self/exe names, without " (deleted)" when the file
/// was replaced by an upgrade (we then exec the new file at that path).
fn own_binary() -> Option<PathBuf> {
    let p = std::fs::read_link("/proc/self/exe").ok()?;
    let s = p.to_string_lossy();
    Some(PathBuf::from(
        s.strip_suffix(" (deleted)").unwrap_or(&s).to_string(),
    ))
}

impl Runtime {
    fn resume_state(&self) -> ResumeState {
        let units = self
            .sup
            .units
            .iter()
            .zip(&self.sup.states)
            .map(|(u, s)| (u.name.clone(), s.clone()))
            .collect();
        let timers = self
            .timers
            .entries()
            .into_iter()
            .filter_map(|(k, at)| match k {
                Key::Unit(i, kind) => Some((self.sup.units[i].name.clone(), kind, at)),
                _ => None,
            })
            .collect();
        ResumeState {
            version: 1,
            mode: self.sup.mode,
            units,
            crashes: self.sup.crashes.iter().cloned().collect(),
            timers,
            booted: self.setup.booted,
            persistent_mounted: self.setup.persistent_mounted,
            orphans_reaped: self.orphans_reaped,
            control_fd: None,
            control_pending: Vec::new(),
            notify_fd: None,
            removed_kills: self
                .timers
                .entries()
                .into_iter()
                .filter_map(|(k, at)| match k {
                    Key::RemovedKill(pid) => Some((pid, at)),
                    _ => None,
                })
                .collect(),
        }
    }

    /// Take over the state of the previous instance.
    pub(super) fn resume(&mut self, r: ResumeState) {
        self.resumed = true;
        self.sup.mode = r.mode;
        self.sup.crashes = r.crashes.into();
        self.setup.booted = r.booted;
        self.setup.persistent_mounted = r.persistent_mounted;
        self.orphans_reaped = r.orphans_reaped;
        // Whatever was queued in the inherited control FIFO is read at once.
        self.control_backlog = r.control_fd.is_some();
        for (name, st) in r.units {
            match self.sup.find(&name) {
                Some(i) => {
                    if let Some(pid) = st.pid {
                        self.pids.insert(pid, i);
                    }
                    self.sup.restore_state(i, st);
                }
                None => {
                    if let Some(pid) = st.pid {
                        log::warn(&format!(
                            "{name}: unit file gone after re-exec; stopping pid {pid}"
                        ));
                        let _ = crate::sys::kill(-pid, libc::SIGTERM);
                    }
                }
            }
        }
        for (name, kind, at) in r.timers {
            if let Some(i) = self.sup.find(&name) {
                self.timers.set(Key::Unit(i, kind), at);
            }
        }
        for (pid, at) in r.removed_kills {
            self.timers.set(Key::RemovedKill(pid), at);
        }
    }

    /// Serialize, then exec our binary with the same arguments plus `--resume FILE`. The control
    /// FIFO and the notify socket stay open across the exec, so nothing queued in them is lost.
    /// Returns only when that failed (the loop then simply goes on).
    pub(super) fn reexec(&mut self) {
        self.save_if_dirty();
        let path = self.setup.run_dir.join(RESUME_FILE);
        // Everything that can fail is prepared before any descriptor is handed over.
        let Some(exe) = own_binary() else {
            log::error("reexec: cannot find our own binary; carrying on");
            return;
        };
        let Some((exe_c, argv, env)) = exec_args(&exe, &self.setup.argv, &path, self.setup.booted)
        else {
            log::error("reexec: an argument or the environment contains a NUL byte; carrying on");
            return;
        };
        let mut state = self.resume_state();
        if let Some(c) = &self.control {
            match c.handover() {
                Ok((fd, pending)) => {
                    state.control_fd = Some(fd);
                    state.control_pending = pending;
                }
                Err(e) => log::warn(&format!("reexec: control FIFO will be reopened: {e}")),
            }
        }
        if let Some(n) = &self.notify {
            match n.handover() {
                Ok(fd) => state.notify_fd = Some(fd),
                Err(e) => log::warn(&format!("reexec: notify socket will be rebound: {e}")),
            }
        }
        let written = serde_json::to_vec(&state)
            .map_err(|e| e.to_string())
            .and_then(|b| crate::persist::write_atomic(&path, &b).map_err(|e| e.to_string()));
        if let Err(e) = written {
            log::error(&format!(
                "reexec: cannot save state to {}: {e}; carrying on",
                path.display()
            ));
            self.reexec_failed(&path);
            return;
        }
        log::info(&format!(
            "reexec: executing {} with {} units",
            exe.display(),
            state.units.len()
        ));
        // Other fds are close-on-exec; children stay our children.
        let e = nix::unistd::execve(&exe_c, &argv, &env);
        log::error(&format!(
            "reexec: exec {}: {e:?}; carrying on",
            exe.display()
        ));
        self.reexec_failed(&path);
    }

    /// The exec did not happen: close-on-exec again, and no stale resume file.
    fn reexec_failed(&self, path: &std::path::Path) {
        if let Some(c) = &self.control {
            c.restore();
        }
        if let Some(n) = &self.notify {
            n.restore();
        }
        let _ = std::fs::remove_file(path);
    }
}

/// The exec call's arguments: our binary, the original arguments without any old `--resume`,
/// plus `--resume FILE` (and `--booted` when a kernel started us), and the environment. Works
/// on raw bytes, so arguments that are not UTF-8 pass unchanged. None if any has a NUL byte.
fn exec_args(
    exe: &std::path::Path,
    original: &[std::ffi::OsString],
    resume_file: &std::path::Path,
    booted: bool,
) -> Option<(CString, Vec<CString>, Vec<CString>)> {
    use std::os::unix::ffi::OsStrExt;
    let c = |b: &[u8]| CString::new(b).ok();
    let exe_c = c(exe.as_os_str().as_bytes())?;
    let mut argv = vec![c(original
        .first()
        .map(|a| a.as_bytes())
        .unwrap_or(exe.as_os_str().as_bytes()))?];
    let mut it = original.iter().skip(1);
    while let Some(a) = it.next() {
        if a == "--resume" {
            it.next();
        } else if a != "--booted" {
            argv.push(c(a.as_bytes())?);
        }
    }
    if booted {
        // Even if the state file cannot be read, the next instance knows the boot was ours.
        argv.push(c(b"--booted")?);
    }
    argv.push(c(b"--resume")?);
    argv.push(c(resume_file.as_os_str().as_bytes())?);
    let mut env = Vec::new();
    for (k, v) in std::env::vars_os() {
        let mut kv = k.as_bytes().to_vec();
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        env.push(c(&kv)?);
    }
    Some((exe_c, argv, env))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;

    #[test]
    fn resume_state_round_trips_and_reads_older_files() {
        let st = ResumeState {
            version: 1,
            mode: Mode::Safe,
            units: vec![],
            crashes: vec![],
            timers: vec![("a".into(), TimerKind::Restart, 1234)],
            booted: true,
            persistent_mounted: true,
            orphans_reaped: 7,
            control_fd: Some(9),
            control_pending: b"TAU/1 {".to_vec(),
            notify_fd: Some(8),
            removed_kills: vec![(4242, 99)],
        };
        let back: ResumeState = serde_json::from_slice(&serde_json::to_vec(&st).unwrap()).unwrap();
        assert_eq!(back, st);
        // A file written before the descriptor hand-over existed still resumes.
        let old = r#"{"version":1,"mode":"normal","units":[],"crashes":[],"timers":[],
            "booted":false,"persistent_mounted":false,"orphans_reaped":0}"#;
        let o: ResumeState = serde_json::from_str(old).unwrap();
        assert_eq!(
            (o.control_fd, o.notify_fd, o.removed_kills.len()),
            (None, None, 0)
        );
    }

    #[test]
    fn exec_args_replace_resume_and_keep_odd_bytes() {
        let original = vec![
            OsString::from("/init"),
            OsString::from_vec(vec![0xff, b'x']),
            OsString::from("--resume"),
            OsString::from("/old"),
            OsString::from("--run-dir=/run/t"),
        ];
        let (exe, argv, _env) = exec_args(
            std::path::Path::new("/sbin/init"),
            &original,
            std::path::Path::new("/run/t/r.json"),
            true,
        )
        .unwrap();
        assert_eq!(exe.as_bytes(), b"/sbin/init");
        let got: Vec<&[u8]> = argv.iter().map(|a| a.as_bytes()).collect();
        assert_eq!(
            got,
            vec![
                &b"/init"[..],
                &[0xff, b'x'][..],
                b"--run-dir=/run/t",
                b"--booted",
                b"--resume",
                b"/run/t/r.json"
            ]
        );
    }
}
