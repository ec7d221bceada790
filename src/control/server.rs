//! The control FIFO server side: `<run-dir>/control` (0600 root, or 0620 with a
//! `control_group`), read without ever blocking, and replies written to the client's own FIFO
//! in `<run-dir>/reply/` with bounded, non-blocking writes.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::protocol::{Line, LineBuffer, Rejected, Request, parse_line};

/// Most bytes read from the control FIFO per wake-up (then other events get a turn).
pub const READ_BUDGET: usize = 256 * 1024;

/// How long a reply may wait for a slow reader before it is dropped.
pub const REPLY_TIMEOUT_MS: u64 = 1000;

/// Largest pipe buffer we ask the kernel for on a reply FIFO.
const REPLY_PIPE_SIZE: i32 = 1 << 20;

/// The listening side.
pub struct ControlServer {
    fifo: File,
    pub path: PathBuf,
    pub reply_dir: PathBuf,
    lines: LineBuffer,
}

/// A request with the identity of its caller (owner of the reply FIFO).
pub struct Incoming {
    pub req: Request,
    pub uid: u32,
    pub reply: File,
}

/// One item read from the FIFO.
pub enum Received {
    Request(Incoming),
    /// Rejected, with the reply FIFO opened when known (to send the error).
    Rejected {
        reason: String,
        reply: Option<File>,
    },
}

/// A reply not yet fully written.
pub struct Pending {
    pub file: File,
    pub data: Vec<u8>,
    pub written: usize,
    pub deadline: u64,
}

impl ControlServer {
    /// Create (or reuse) the FIFO and the reply directory, and open the FIFO read-write so it
    /// never reports EOF. `inherited` is the FIFO's descriptor and unfinished line handed over
    /// by the previous tau-init across re-exec: kept open, nothing queued in it is lost.
    pub fn open(
        run_dir: &Path,
        control_gid: Option<u32>,
        inherited: Option<(OwnedFd, Vec<u8>)>,
    ) -> Result<Self, String> {
        let path = run_dir.join("control");
        let reply_dir = run_dir.join("reply");
        fs::create_dir_all(run_dir).map_err(|e| format!("mkdir {}: {e}", run_dir.display()))?;
        fs::create_dir_all(&reply_dir)
            .map_err(|e| format!("mkdir {}: {e}", reply_dir.display()))?;
        // Sticky and writable for all, but not listable: a reply FIFO's random name is what
        // keeps other users from naming it in their requests.
        fs::set_permissions(&reply_dir, fs::Permissions::from_mode(0o1733))
            .map_err(|e| format!("chmod {}: {e}", reply_dir.display()))?;
        match fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_fifo() => {}
            Ok(_) => {
                fs::remove_file(&path).map_err(|e| format!("remove {}: {e}", path.display()))?
            }
            Err(_) => {}
        }
        if !path.exists() {
            nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
                .map_err(|e| format!("mkfifo {}: {}", path.display(), e.desc()))?;
        }
        let mode = if control_gid.is_some() { 0o620 } else { 0o600 };
        std::os::unix::fs::chown(&path, Some(0), Some(control_gid.unwrap_or(0)))
            .map_err(|e| format!("chown {}: {e}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .map_err(|e| format!("chmod {}: {e}", path.display()))?;
        let on_disk = fs::metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if let Some((fd, pending)) = inherited {
            let f = File::from(fd);
            let same = f.metadata().is_ok_and(|m| {
                m.file_type().is_fifo() && m.dev() == on_disk.dev() && m.ino() == on_disk.ino()
            });
            if same && crate::sys::set_cloexec(&f, true).is_ok() {
                return Ok(Self {
                    fifo: f,
                    path,
                    reply_dir,
                    lines: LineBuffer::with_pending(pending),
                });
            }
        }
        let fifo = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| format!("open {}: {e}", path.display()))?;
        Ok(Self {
            fifo,
            path,
            reply_dir,
            lines: LineBuffer::default(),
        })
    }

    /// Keep the FIFO open across exec: returns its fd (close-on-exec cleared) and the
    /// unfinished line. `restore` undoes it when the exec failed.
    pub fn handover(&self) -> Result<(i32, Vec<u8>), String> {
        crate::sys::set_cloexec(&self.fifo, false)?;
        Ok((self.fifo.as_raw_fd(), self.lines.pending().to_vec()))
    }

    /// Close-on-exec again (the exec failed).
    pub fn restore(&self) {
        let _ = crate::sys::set_cloexec(&self.fifo, true);
    }

    /// Raw fd for poll registration.
    pub fn fd(&self) -> i32 {
        self.fifo.as_raw_fd()
    }

    /// Read what is there (up to [`READ_BUDGET`]); returns the requests and whether more may be
    /// waiting.
    pub fn receive(&mut self) -> (Vec<Received>, bool) {
        let mut out = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        let mut total = 0;
        loop {
            if total >= READ_BUDGET {
                return (out, true);
            }
            match self.fifo.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    total += n;
                    for line in self.lines.push(&buf[..n]) {
                        match line {
                            Line::Oversized => {
                                out.push(Received::Rejected {
                                    reason: "request too long".into(),
                                    reply: None,
                                });
                            }
                            Line::Complete(l) => out.push(self.accept(&l)),
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break, // EAGAIN: drained
            }
        }
        (out, false)
    }

    fn accept(&mut self, line: &[u8]) -> Received {
        match parse_line(line) {
            Ok(req) => match self.open_reply(&req.reply) {
                Ok((reply, uid)) => Received::Request(Incoming { req, uid, reply }),
                Err(reason) => Received::Rejected {
                    reason: format!("reply FIFO {}: {reason}", req.reply),
                    reply: None,
                },
            },
            Err(Rejected { reply, reason }) => {
                let reply = reply.and_then(|p| self.open_reply(&p).ok()).map(|(f, _)| f);
                Received::Rejected { reason, reply }
            }
        }
    }

    /// Open a client's reply FIFO: it must be a FIFO directly inside the reply directory, not a
    /// link, with one name; its owner is the caller's identity. Never blocks: a client that did
    /// not open its end for reading gets nothing (ENXIO).
    pub fn open_reply(&self, path: &str) -> Result<(File, u32), String> {
        let p = Path::new(path);
        let name_ok = p.file_name().is_some_and(|n| n != "." && n != "..");
        if !name_ok || p.parent() != Some(self.reply_dir.as_path()) {
            return Err(format!(
                "must be a file directly inside {}",
                self.reply_dir.display()
            ));
        }
        let f = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(p)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENXIO) => "nobody is reading it".to_string(),
                Some(libc::ELOOP) => "is a symbolic link".to_string(),
                _ => e.to_string(),
            })?;
        let m = f.metadata().map_err(|e| e.to_string())?;
        if !m.file_type().is_fifo() {
            return Err("not a FIFO".into());
        }
        if m.nlink() != 1 {
            return Err("has more than one name".into());
        }
        let _ = nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_SETPIPE_SZ(REPLY_PIPE_SIZE));
        Ok((f, m.uid()))
    }
}

impl Pending {
    /// Write what the pipe takes now. Ok(true) when done; Err when the reader is gone.
    pub fn flush(&mut self) -> Result<bool, String> {
        while self.written < self.data.len() {
            match self.file.write(&self.data[self.written..]) {
                Ok(0) => return Err("reply FIFO closed".into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(true)
    }
}
