//! The client side used by `taucli`: make a reply FIFO, send one request line, wait (bounded)
//! for the reply, and always remove the FIFO.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::protocol::{Reply, Request, encode};

/// Why a call failed before a reply arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// tau-init is not there or did not answer in time (taucli exit code 3).
    Unreachable(String),
    /// Anything else (bad request, unreadable reply): exit code 1.
    Failed(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Unreachable(m) | CallError::Failed(m) => f.write_str(m),
        }
    }
}

struct ReplyFifo(PathBuf);

impl Drop for ReplyFifo {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Send `cmd` with `args`/`flags` to tau-init at `run_dir` and wait up to `timeout_ms`.
pub fn call(
    run_dir: &Path,
    cmd: &str,
    args: Vec<String>,
    flags: BTreeMap<String, serde_json::Value>,
    timeout_ms: u64,
) -> Result<Reply, CallError> {
    // A relative run dir would give tau-init a relative reply path, which it must refuse.
    let run_dir = &std::path::absolute(run_dir).unwrap_or_else(|_| run_dir.to_path_buf());
    let control = run_dir.join("control");
    let unreachable = |why: String| {
        CallError::Unreachable(format!(
            "tau-init is unreachable at {}: {why}",
            control.display()
        ))
    };
    if !control.exists() {
        return Err(unreachable(
            "no control FIFO (is tau-init running with this --run-dir?)".into(),
        ));
    }
    let reply_dir = run_dir.join("reply");
    let path = reply_dir.join(reply_name().map_err(CallError::Failed)?);
    nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .map_err(|e| CallError::Failed(format!("mkfifo {}: {}", path.display(), e.desc())))?;
    let guard = ReplyFifo(path.clone());
    let mut reader = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| CallError::Failed(format!("open {}: {e}", path.display())))?;
    let req = Request {
        reply: path.display().to_string(),
        cmd: cmd.to_string(),
        args,
        flags,
    };
    let line = encode(&req).map_err(CallError::Failed)?;
    let mut w = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&control)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENXIO) => unreachable("nobody is reading the control FIFO".into()),
            Some(libc::EACCES) => {
                CallError::Failed(format!("{}: permission denied", control.display()))
            }
            _ => unreachable(e.to_string()),
        })?;
    match w.write(&line) {
        Ok(n) if n == line.len() => {}
        Ok(_) => return Err(unreachable("control FIFO is full".into())),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            return Err(unreachable("control FIFO is full".into()));
        }
        Err(e) => return Err(unreachable(e.to_string())),
    }
    drop(w);
    let data = read_reply(&mut reader, timeout_ms).map_err(unreachable)?;
    drop(guard);
    serde_json::from_slice::<Reply>(&data)
        .map_err(|e| CallError::Failed(format!("unreadable reply from tau-init: {e}")))
}

/// A reply FIFO name nobody can guess: the reply directory is not listable (mode 1733), so the
/// name is the capability that ties a reply FIFO to the client that made it.
pub fn reply_name() -> Result<String, String> {
    let mut r = [0u8; 16];
    let mut f = File::open("/dev/urandom").map_err(|e| format!("/dev/urandom: {e}"))?;
    f.read_exact(&mut r)
        .map_err(|e| format!("/dev/urandom: {e}"))?;
    let hex: String = r.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("taucli.{hex}"))
}

/// Read until the writer closes or the deadline passes.
fn read_reply(reader: &mut File, timeout_ms: u64) -> Result<Vec<u8>, String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(timeout_ms);
    let mut data = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    let mut got_writer = false;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(format!("no reply within {timeout_ms} ms"));
        }
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(reader.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(format!("poll: {}", e.desc())),
        }
        let rev = fds[0].revents().unwrap_or(PollFlags::empty());
        if rev.contains(PollFlags::POLLIN) || rev.contains(PollFlags::POLLHUP) {
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => {
                        if got_writer || !data.is_empty() {
                            return Ok(data);
                        }
                        break;
                    }
                    Ok(n) => {
                        got_writer = true;
                        data.extend_from_slice(&buf[..n]);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e.to_string()),
                }
            }
            if rev.contains(PollFlags::POLLHUP) && !data.is_empty() {
                return Ok(data);
            }
            if rev.contains(PollFlags::POLLHUP) && data.is_empty() {
                // A writer came and went without a byte: nothing more will come.
                return Err("tau-init closed the reply without an answer".into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_names_are_random_128_bit() {
        let a = reply_name().unwrap();
        let b = reply_name().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), "taucli.".len() + 32);
        assert!(a["taucli.".len()..].chars().all(|c| c.is_ascii_hexdigit()));
    }
}
