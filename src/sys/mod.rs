//! Thin wrappers over the syscalls tau-init needs that nix does not cover safely, plus the
//! child half of process spawning. The only module allowed to contain `unsafe`.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::errno::Errno;

/// Monotonic milliseconds (CLOCK_MONOTONIC), the one clock of the supervisor. System-wide, so
/// values survive a re-exec of tau-init.
pub fn monotonic_ms() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => (ts.tv_sec() as u64).saturating_mul(1000) + (ts.tv_nsec() as u64) / 1_000_000,
        Err(_) => 0,
    }
}

/// Wall-clock milliseconds since the Unix epoch (for records shown to people).
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Become a child subreaper: orphans of our descendants are reparented to us.
pub fn set_child_subreaper() -> nix::Result<()> {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER, 1) takes integer arguments only and has no memory
    // effects on our process.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) };
    Errno::result(rc).map(drop)
}

/// Load a kernel module from an open file (`finit_module(2)`).
pub fn finit_module(file: &std::fs::File, params: &CStr) -> nix::Result<()> {
    // SAFETY: fd is open for the duration of the call (borrowed from `file`), params is a valid
    // NUL-terminated string, flags are 0.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            params.as_ptr(),
            0 as libc::c_int,
        )
    };
    Errno::result(rc).map(drop)
}

/// `sync(2)`: flush all filesystem buffers.
pub fn sync() {
    nix::unistd::sync();
}

/// Signal one process; ESRCH (already gone) is not an error.
pub fn kill(pid: i32, sig: i32) -> nix::Result<()> {
    // SAFETY: kill(2) takes plain integers.
    let rc = unsafe { libc::kill(pid, sig) };
    match Errno::result(rc) {
        Err(Errno::ESRCH) | Ok(_) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Ignore a signal (SIGPIPE: a write to a vanished reader becomes EPIPE). Children get default
/// dispositions back before exec.
pub fn ignore_signal(sig: i32) {
    // SAFETY: installing SIG_IGN runs no handler code, so no async-signal-safety concerns.
    unsafe { libc::signal(sig, libc::SIG_IGN) };
}

/// Fork into the background for `--daemon`: the parent returns Ok(true) (and should exit), the
/// child returns Ok(false) in a new session with stdin on /dev/null and stdout/stderr appended
/// to `log`.
pub fn daemonize(log: &std::path::Path) -> Result<bool, String> {
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    }
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("{}: {e}", log.display()))?;
    let null = std::fs::File::open("/dev/null").map_err(|e| format!("/dev/null: {e}"))?;
    // SAFETY: called from main before any thread exists; the child continues as a normal
    // single-threaded program.
    match unsafe { nix::unistd::fork() }.map_err(|e| format!("fork: {}", e.desc()))? {
        nix::unistd::ForkResult::Parent { child } => {
            println!("{child}");
            Ok(true)
        }
        nix::unistd::ForkResult::Child => {
            let _ = nix::unistd::setsid();
            let _ = nix::unistd::dup2_stdin(&null);
            let _ = nix::unistd::dup2_stdout(&out);
            let _ = nix::unistd::dup2_stderr(&out);
            Ok(false)
        }
    }
}

/// Set or clear close-on-exec on a descriptor.
pub fn set_cloexec(fd: &impl std::os::fd::AsFd, on: bool) -> Result<(), String> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    let flags = if on {
        FdFlag::FD_CLOEXEC
    } else {
        FdFlag::empty()
    };
    fcntl(fd, FcntlArg::F_SETFD(flags))
        .map(drop)
        .map_err(|e| format!("fcntl F_SETFD: {}", e.desc()))
}

/// Take ownership of a descriptor number handed over by the previous tau-init across
/// re-exec. None when it is not open.
pub fn adopt_fd(fd: RawFd) -> Option<OwnedFd> {
    if fd < 3 {
        return None;
    }
    // SAFETY: F_GETFD on an integer fd only reads the descriptor table.
    let open = unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0;
    if !open {
        return None;
    }
    // SAFETY: the fd is open and was inherited across exec for us alone (the previous instance
    // named it in the resume file); nothing else in this process owns it.
    Some(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

/// Pids whose parent is `ppid`, from `/proc/<pid>/stat` texts (pure over a stat line).
pub fn stat_ppid(stat: &str) -> Option<i32> {
    // "pid (comm) state ppid ..." where comm may contain spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Stop every child of this process (and its process group): SIGTERM, up to `grace_ms` of
/// reaping, then SIGKILL. Used when a re-exec could not take over the previous instance's units.
pub fn stop_own_children(grace_ms: u64) {
    let me = std::process::id() as i32;
    let children = || -> Vec<i32> {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|s| stat_ppid(&s))
                    == Some(me)
            })
            .collect()
    };
    for sig in [libc::SIGTERM, libc::SIGKILL] {
        for pid in children() {
            let _ = kill(-pid, sig);
            let _ = kill(pid, sig);
        }
        let deadline = monotonic_ms().saturating_add(grace_ms);
        while monotonic_ms() < deadline {
            while let Ok(Some(_)) = reap_one() {}
            if children().is_empty() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// Block forever (crash action `freeze`, or after a failed reboot(2)).
pub fn freeze() -> ! {
    loop {
        // SAFETY: pause(2) has no arguments and only returns on a signal.
        unsafe { libc::pause() };
    }
}

/// Replace this process with an emergency shell on the console (crash action `shell`). Returns
/// only if exec failed.
pub fn exec_emergency_shell() {
    let sh = c"/bin/sh";
    let argv = [sh.as_ptr(), std::ptr::null()];
    let envp = [
        c"PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".as_ptr(),
        c"TERM=linux".as_ptr(),
        std::ptr::null(),
    ];
    // SAFETY: argv and envp are NULL-terminated arrays of valid C strings that outlive the call.
    unsafe { libc::execve(sh.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
}

/// Where a spawned child failed before exec, reported through the exec-status pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExecStage {
    Setsid = 1,
    Cgroup = 2,
    Stdio = 3,
    Chdir = 4,
    Setgroups = 5,
    Setgid = 6,
    Setuid = 7,
    Exec = 8,
    SignalMask = 9,
}

impl ExecStage {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Setsid,
            2 => Self::Cgroup,
            3 => Self::Stdio,
            4 => Self::Chdir,
            5 => Self::Setgroups,
            6 => Self::Setgid,
            7 => Self::Setuid,
            8 => Self::Exec,
            9 => Self::SignalMask,
            _ => return None,
        })
    }

    /// Lower-case name for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Setsid => "setsid",
            Self::Cgroup => "join cgroup",
            Self::Stdio => "set up stdio",
            Self::Chdir => "chdir",
            Self::Setgroups => "setgroups",
            Self::Setgid => "setgid",
            Self::Setuid => "setuid",
            Self::Exec => "exec",
            Self::SignalMask => "reset signals",
        }
    }
}

/// Everything the child needs, prepared before fork so the child never allocates.
pub struct SpawnSpec {
    pub path: CString,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    pub cwd: Option<CString>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// An open `cgroup.procs` of the unit's cgroup; the child writes "0" to join it.
    pub cgroup_procs: Option<OwnedFd>,
    /// stdin: None = /dev/null. stdout/stderr: None = inherit ours.
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    /// Make stdin the controlling terminal (a shell on the console).
    pub controlling_tty: bool,
}

/// A failure to spawn: in the parent (fork/pipe) or in the child at `stage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpawnError {
    pub stage: Option<ExecStage>,
    pub errno: Errno,
}

impl std::fmt::Display for SpawnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.stage {
            Some(s) => write!(f, "{} failed: {}", s.as_str(), self.errno.desc()),
            None => write!(f, "fork failed: {}", self.errno.desc()),
        }
    }
}

/// Fork and exec `spec`. Returns the child's pid once exec succeeded, or where it failed.
///
/// The caller must be single-threaded (tau-init is: one event loop, no threads), so the child
/// may run any async-signal-safe code; it runs only raw syscalls on data prepared here.
pub fn spawn(spec: &SpawnSpec) -> Result<i32, SpawnError> {
    let parent_err = |errno| SpawnError { stage: None, errno };
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(parent_err)?;
    let mut argv: Vec<*const libc::c_char> = spec.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = spec.envp.iter().map(|a| a.as_ptr()).collect();
    envp.push(std::ptr::null());
    let devnull = c"/dev/null";
    // Block every signal across fork, so no handler of ours runs in the child before it has
    // reset the dispositions; the parent restores its mask right after.
    let mut all: libc::sigset_t = unsafe_zeroed_sigset();
    let mut old: libc::sigset_t = unsafe_zeroed_sigset();
    // SAFETY: sigfillset/sigprocmask write only to the sigset_t values we own here.
    unsafe {
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_SETMASK, &all, &mut old);
    }
    // SAFETY: fork(2) in a single-threaded process; the child only calls async-signal-safe
    // functions (see child_after_fork) and always ends in execve or _exit.
    let pid = unsafe { libc::fork() };
    if pid != 0 {
        // SAFETY: restores the mask saved above; `old` is a valid sigset_t.
        unsafe { libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    }
    if pid < 0 {
        return Err(parent_err(Errno::last()));
    }
    if pid == 0 {
        // SAFETY: we are the child of a fork from a single-threaded parent; all pointers refer to
        // memory copied into our address space by fork and stay valid until exec or _exit.
        unsafe { child_after_fork(spec, &argv, &envp, devnull, wr.as_raw_fd()) }
    }
    drop(wr);
    // Read {stage, errno} or EOF (exec succeeded: CLOEXEC closed the pipe).
    let mut buf = [0u8; 5];
    let mut got = 0usize;
    let file = std::fs::File::from(rd);
    loop {
        match io::Read::read(&mut &file, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => {
                got += n;
                if got == buf.len() {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    if got == buf.len() {
        let stage = ExecStage::from_u8(buf[0]);
        let errno = Errno::from_raw(i32::from_ne_bytes([buf[1], buf[2], buf[3], buf[4]]));
        // The child has _exit()ed; the reaper collects it.
        return Err(SpawnError {
            stage: stage.or(Some(ExecStage::Exec)),
            errno,
        });
    }
    Ok(pid)
}

/// The child side of [`spawn`]. Never returns.
///
/// # Safety
/// Must be called only in the child of a fork from a single-threaded process, with pointers into
/// `spec`, `argv` and `envp` that are valid and NULL-terminated where required.
unsafe fn child_after_fork(
    spec: &SpawnSpec,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    devnull: &CStr,
    status_fd: RawFd,
) -> ! {
    // SAFETY: all calls below are async-signal-safe syscalls on valid fds, pointers and
    // NUL-terminated strings prepared by the parent before fork (caller's contract).
    unsafe {
        let fail = |stage: ExecStage| -> ! {
            let e = *libc::__errno_location();
            let b = e.to_ne_bytes();
            let msg = [stage as u8, b[0], b[1], b[2], b[3]];
            libc::write(status_fd, msg.as_ptr().cast(), msg.len());
            libc::_exit(127);
        };
        // Signals (all blocked since before fork): default dispositions first, then an empty
        // mask, as a fresh process expects. Real-time signals too; the C library's own ones
        // just refuse, which is fine.
        for sig in 1..=libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        if libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) != 0 {
            fail(ExecStage::SignalMask);
        }
        if libc::setsid() < 0 {
            fail(ExecStage::Setsid);
        }
        if let Some(fd) = &spec.cgroup_procs {
            let zero = b"0\n";
            if libc::write(fd.as_raw_fd(), zero.as_ptr().cast(), zero.len()) < 0 {
                fail(ExecStage::Cgroup);
            }
        }
        let stdin_fd = match &spec.stdin {
            Some(fd) => fd.as_raw_fd(),
            None => {
                let fd = libc::open(devnull.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
                if fd < 0 {
                    fail(ExecStage::Stdio);
                }
                fd
            }
        };
        if libc::dup2(stdin_fd, 0) < 0 {
            fail(ExecStage::Stdio);
        }
        if let Some(fd) = &spec.stdout
            && libc::dup2(fd.as_raw_fd(), 1) < 0
        {
            fail(ExecStage::Stdio);
        }
        if let Some(fd) = &spec.stderr
            && libc::dup2(fd.as_raw_fd(), 2) < 0
        {
            fail(ExecStage::Stdio);
        }
        // Nothing but 0, 1 and 2 crosses exec, even a descriptor someone forgot to mark
        // close-on-exec (Linux 5.11+; older kernels keep relying on O_CLOEXEC everywhere).
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
        if spec.controlling_tty {
            // Best effort: a shell without job control still works.
            libc::ioctl(0, libc::TIOCSCTTY, 1);
        }
        if let Some(cwd) = &spec.cwd
            && libc::chdir(cwd.as_ptr()) != 0
        {
            fail(ExecStage::Chdir);
        }
        if let Some(gid) = spec.gid {
            if libc::setgroups(0, std::ptr::null()) != 0 {
                fail(ExecStage::Setgroups);
            }
            if libc::setgid(gid) != 0 {
                fail(ExecStage::Setgid);
            }
        }
        if let Some(uid) = spec.uid
            && libc::setuid(uid) != 0
        {
            fail(ExecStage::Setuid);
        }
        libc::execve(spec.path.as_ptr(), argv.as_ptr(), envp.as_ptr());
        fail(ExecStage::Exec)
    }
}

fn unsafe_zeroed_sigset() -> libc::sigset_t {
    // SAFETY: sigset_t is a plain C struct for which all-zero bytes are a valid (empty) value.
    unsafe { std::mem::zeroed() }
}

/// How a reaped child ended, decoded from a raw wait status (pure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitResult {
    Exited(i32),
    /// Signal number (real-time ones included) and whether a core was dumped.
    Signaled(i32, bool),
}

/// Decode a `waitpid` status word; None for stopped/continued reports.
pub fn decode_wait_status(status: i32) -> Option<WaitResult> {
    if libc::WIFEXITED(status) {
        Some(WaitResult::Exited(libc::WEXITSTATUS(status)))
    } else if libc::WIFSIGNALED(status) {
        Some(WaitResult::Signaled(
            libc::WTERMSIG(status),
            libc::WCOREDUMP(status),
        ))
    } else {
        None
    }
}

/// `waitpid(-1, WNOHANG)`: Ok(None) when no child has ended, Err(ECHILD) when there are no
/// children. Decodes the status itself so any signal number, real-time ones too, is reported
/// (nix refuses those after the child is already reaped).
pub fn reap_one() -> Result<Option<(i32, Option<WaitResult>)>, Errno> {
    let mut status: libc::c_int = 0;
    // SAFETY: waitpid writes the status into our local integer.
    let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
    match pid {
        0 => Ok(None),
        p if p > 0 => Ok(Some((p, decode_wait_status(status)))),
        _ => Err(Errno::last()),
    }
}

/// True when fd 0, 1 and 2 are open (the kernel opened /dev/console for us, or a parent did).
pub fn stdio_open() -> bool {
    (0..3).all(|fd| {
        // SAFETY: F_GETFD on an integer fd only reads the descriptor table.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        flags >= 0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(path: &CStr, cwd: Option<&CStr>) -> SpawnSpec {
        SpawnSpec {
            path: path.into(),
            argv: vec![path.into()],
            envp: vec![],
            cwd: cwd.map(Into::into),
            uid: None,
            gid: None,
            cgroup_procs: None,
            stdin: None,
            stdout: None,
            stderr: None,
            controlling_tty: false,
        }
    }

    #[test]
    fn spawn_reports_the_stage_that_failed_in_the_child() {
        // The child fails before exec: the exec-status pipe names the stage and errno. (The
        // failed children stay zombies of the test process; reaping with -1 here could steal
        // another test's child.)
        let e = spawn(&spec(c"/bin/true", Some(c"/nonexistent-tau-dir"))).unwrap_err();
        assert_eq!((e.stage, e.errno), (Some(ExecStage::Chdir), Errno::ENOENT));
        assert_eq!(e.to_string(), "chdir failed: No such file or directory");
        let e = spawn(&spec(c"/nonexistent-tau-binary", None)).unwrap_err();
        assert_eq!((e.stage, e.errno), (Some(ExecStage::Exec), Errno::ENOENT));
    }

    #[test]
    fn spawn_returns_the_pid_once_exec_succeeded() {
        let pid = spawn(&spec(c"/bin/true", Some(c"/"))).unwrap();
        let mut status = 0;
        // SAFETY: waitpid writes into our local integer.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert_eq!(decode_wait_status(status), Some(WaitResult::Exited(0)));
    }

    #[test]
    fn ppid_from_stat_with_odd_command_names() {
        assert_eq!(stat_ppid("42 (sleep) S 7 42 42 0 -1"), Some(7));
        assert_eq!(stat_ppid("42 (a) b) (c) R 9 1 1"), Some(9));
        assert_eq!(stat_ppid("garbage"), None);
        assert_eq!(stat_ppid(""), None);
    }

    #[test]
    fn wait_status_decoding_covers_realtime_signals_and_core() {
        // Layout of the Linux wait status: exit code << 8; signal in the low 7 bits; 0x80 core.
        assert_eq!(decode_wait_status(3 << 8), Some(WaitResult::Exited(3)));
        assert_eq!(decode_wait_status(0), Some(WaitResult::Exited(0)));
        assert_eq!(decode_wait_status(9), Some(WaitResult::Signaled(9, false)));
        assert_eq!(
            decode_wait_status(11 | 0x80),
            Some(WaitResult::Signaled(11, true))
        );
        assert_eq!(
            decode_wait_status(34),
            Some(WaitResult::Signaled(34, false))
        );
        // Stopped (0x7f) is not an end.
        assert_eq!(decode_wait_status((19 << 8) | 0x7f), None);
    }

    #[test]
    #[allow(clippy::zombie_processes)] // reaped by the raw waitpid below
    fn realtime_signal_death_is_reaped_and_reported() {
        let child = std::process::Command::new("/bin/sh")
            .args(["-c", "kill -34 $$"])
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let mut status = 0;
        // Wait for exactly our child (other tests may have children too).
        // SAFETY: waitpid writes into our local integer.
        let got = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(got, pid);
        assert_eq!(
            decode_wait_status(status),
            Some(WaitResult::Signaled(34, false))
        );
    }
}
