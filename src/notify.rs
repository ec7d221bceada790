//! The sd_notify-compatible readiness socket: `NOTIFY_SOCKET=<run-dir>/notify`, an AF_UNIX
//! datagram socket with SO_PASSCRED, so each message carries the sender's pid.

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg, setsockopt, sockopt};

/// Largest datagram read; longer ones are truncated (sd_notify messages are short).
pub const MAX_MSG: usize = 4096;

/// What a notify message says (pure parse of `KEY=VALUE` lines).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Notice {
    pub ready: bool,
    pub stopping: bool,
    pub status: Option<String>,
}

/// Parse one datagram's payload.
pub fn parse(payload: &[u8]) -> Notice {
    let mut n = Notice::default();
    for line in String::from_utf8_lossy(payload).lines() {
        match line.split_once('=') {
            Some(("READY", "1")) => n.ready = true,
            Some(("STOPPING", "1")) => n.stopping = true,
            Some(("STATUS", s)) => n.status = Some(s.chars().take(256).collect()),
            _ => {}
        }
    }
    n
}

/// The bound socket.
pub struct NotifySocket {
    sock: UnixDatagram,
    pub path: PathBuf,
}

impl NotifySocket {
    /// Bind at `path` (replacing a stale socket file), non-blocking, with SO_PASSCRED.
    ///
    /// `inherited` is the socket handed over by the previous tau-init across re-exec: kept, so
    /// no READY=1 sent meanwhile is lost.
    pub fn bind(path: &Path, inherited: Option<std::os::fd::OwnedFd>) -> std::io::Result<Self> {
        if let Some(fd) = inherited {
            let sock = UnixDatagram::from(fd);
            if sock
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(Path::to_path_buf))
                .as_deref()
                == Some(path)
                && crate::sys::set_cloexec(&sock, true).is_ok()
            {
                return Ok(Self {
                    sock,
                    path: path.to_path_buf(),
                });
            }
        }
        let _ = std::fs::remove_file(path);
        let sock = UnixDatagram::bind(path)?;
        sock.set_nonblocking(true)?;
        setsockopt(&sock, sockopt::PassCred, &true).map_err(std::io::Error::from)?;
        // Units may run as other users: let them send.
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666));
        Ok(Self {
            sock,
            path: path.to_path_buf(),
        })
    }

    /// Keep the socket open across exec: returns its fd with close-on-exec cleared.
    pub fn handover(&self) -> Result<i32, String> {
        crate::sys::set_cloexec(&self.sock, false)?;
        Ok(self.sock.as_raw_fd())
    }

    /// Close-on-exec again (the exec failed).
    pub fn restore(&self) {
        let _ = crate::sys::set_cloexec(&self.sock, true);
    }

    /// Raw fd for poll registration.
    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Read every pending datagram: (sender pid, notice). Datagrams without credentials are
    /// dropped.
    pub fn drain(&self) -> Vec<(i32, Notice)> {
        let mut out = Vec::new();
        let mut buf = [0u8; MAX_MSG];
        // Bounded: never loop forever on a flood.
        for _ in 0..256 {
            let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = match recvmsg::<()>(
                self.sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(m) => m,
                Err(_) => break,
            };
            let len = msg.bytes;
            let mut pid = None;
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmCredentials(cred) = c {
                        pid = Some(cred.pid());
                    }
                }
            }
            if let Some(pid) = pid {
                out.push((pid, parse(&buf[..len.min(MAX_MSG)])));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ready_status_and_ignores_the_rest() {
        let n = parse(b"READY=1\nSTATUS=serving 3 clients\nWATCHDOG=1\nbogus\n");
        assert!(n.ready && !n.stopping);
        assert_eq!(n.status.as_deref(), Some("serving 3 clients"));
        assert_eq!(parse(b"READY=0"), Notice::default());
        assert_eq!(parse(&[0xff, 0xfe]), Notice::default());
    }

    #[test]
    fn real_socket_reports_sender_pid() {
        let path = std::env::temp_dir().join(format!("tau-notify-{}", std::process::id()));
        let s = NotifySocket::bind(&path, None).unwrap();
        let c = UnixDatagram::unbound().unwrap();
        c.send_to(b"READY=1", &path).unwrap();
        let got = s.drain();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, std::process::id() as i32);
        assert!(got[0].1.ready);
        let _ = std::fs::remove_file(&path);
    }
}
