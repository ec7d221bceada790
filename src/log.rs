//! tau-init's log: one line per record on the console (stderr), and a bounded in-memory ring of
//! recent records for `taucli logs`. Never blocks the loop for long and never panics.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Mutex;

use serde::Serialize;

pub use crate::supervisor::Level;

/// Records kept in memory.
pub const RING: usize = 1000;

/// One log record.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Record {
    /// Sequence number, increasing from 1 (for `taucli logs --follow`).
    pub seq: u64,
    /// Wall clock, ms since the Unix epoch.
    pub time_ms: u64,
    pub level: Level,
    /// Unit the record is about, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    pub message: String,
}

struct Logger {
    level: Level,
    ring: VecDeque<Record>,
    /// Records dropped from the ring since start.
    dropped: u64,
    counts: [u64; 4],
    seq: u64,
    /// PID 1's own non-blocking handle on the console (None: write to stderr).
    console: Option<std::fs::File>,
    /// Console lines lost because the console could not take them (flow control, slow line).
    console_dropped: u64,
}

static LOGGER: Mutex<Logger> = Mutex::new(Logger {
    level: Level::Info,
    ring: VecDeque::new(),
    dropped: 0,
    counts: [0; 4],
    seq: 0,
    console: None,
    console_dropped: 0,
});

fn with<R>(f: impl FnOnce(&mut Logger) -> R) -> R {
    let mut g = LOGGER.lock().unwrap_or_else(|e| e.into_inner());
    f(&mut g)
}

/// Parse a level name (`error`, `warn`, `info`, `debug`).
pub fn parse_level(s: &str) -> Option<Level> {
    Some(match s {
        "error" => Level::Error,
        "warn" | "warning" => Level::Warn,
        "info" => Level::Info,
        "debug" => Level::Debug,
        _ => return None,
    })
}

/// Name of a level.
pub fn level_str(l: Level) -> &'static str {
    match l {
        Level::Error => "error",
        Level::Warn => "warn",
        Level::Info => "info",
        Level::Debug => "debug",
    }
}

/// Set the most verbose level written to the console.
pub fn set_level(l: Level) {
    with(|g| g.level = l);
}

/// Log a record about the system (`unit` None) or a unit.
pub fn log(level: Level, unit: Option<&str>, message: &str) {
    let mut rec = Record {
        seq: 0,
        time_ms: crate::sys::wall_ms(),
        level,
        unit: unit.map(str::to_string),
        message: message.to_string(),
    };
    let show = with(|g| {
        g.counts[level as usize] += 1;
        g.seq += 1;
        rec.seq = g.seq;
        if g.ring.len() >= RING {
            g.ring.pop_front();
            g.dropped += 1;
        }
        g.ring.push_back(rec);
        level <= g.level
    });
    if show {
        let mono = crate::sys::monotonic_ms();
        let line = format!(
            "[{:>5}.{:03}] tau-init: {}: {}\n",
            mono / 1000,
            mono % 1000,
            level_str(level),
            message
        );
        with(|g| match &mut g.console {
            // Never wait for the console: a line it cannot take now is counted and dropped.
            Some(c) => {
                if !matches!(c.write(line.as_bytes()), Ok(n) if n == line.len()) {
                    g.console_dropped += 1;
                }
            }
            // A console that fails must not stop PID 1.
            None => {
                let _ = std::io::stderr().write_all(line.as_bytes());
            }
        });
    }
}

/// As PID 1 on a real console: log through a handle of our own opened non-blocking, so a
/// console held by flow control (Ctrl-S) or a slow serial line can never stall the loop. Units
/// keep the kernel's blocking console on their stdout and stderr.
pub fn use_nonblocking_console() {
    use std::os::unix::fs::OpenOptionsExt;
    if let Ok(f) = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open("/dev/console")
    {
        with(|g| g.console = Some(f));
    }
}

/// Console lines dropped because the console was not ready.
pub fn console_dropped() -> u64 {
    with(|g| g.console_dropped)
}

/// The newest `n` records after sequence number `since`, optionally only about `unit`, oldest
/// first.
pub fn recent(n: usize, unit: Option<&str>, since: u64) -> Vec<Record> {
    with(|g| {
        let mut v: Vec<Record> = g
            .ring
            .iter()
            .rev()
            .take_while(|r| r.seq > since)
            .filter(|r| {
                unit.is_none_or(|u| {
                    r.unit.as_deref() == Some(u) || r.message.starts_with(&format!("{u}:"))
                })
            })
            .take(n)
            .cloned()
            .collect();
        v.reverse();
        v
    })
}

/// Records logged per level (error, warn, info, debug), records dropped from the ring, the
/// ring's length and the last sequence number.
pub fn stats() -> ([u64; 4], u64, usize, u64) {
    with(|g| (g.counts, g.dropped, g.ring.len(), g.seq))
}

/// `error!`-style helpers.
pub fn error(m: &str) {
    log(Level::Error, None, m)
}
/// Log at warn level.
pub fn warn(m: &str) {
    log(Level::Warn, None, m)
}
/// Log at info level.
pub fn info(m: &str) {
    log(Level::Info, None, m)
}
/// Log at debug level.
pub fn debug(m: &str) {
    log(Level::Debug, None, m)
}
