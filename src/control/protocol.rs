//! The control protocol (pure, fuzzable). One request per line on the control FIFO:
//!
//! ```text
//! TAU/1 {"reply":"/run/tau/reply/taucli.123.0","cmd":"status","args":["tau-session"],"flags":{}}\n
//! ```
//!
//! A line is at most [`MAX_REQUEST`] bytes including the newline (PIPE_BUF, so concurrent
//! writers never interleave). The reply, written to the client's reply FIFO, is one JSON
//! document followed by a newline: `{"v":1,"ok":true,"data":...}` or
//! `{"v":1,"ok":false,"error":"..."}`. A line that does not parse is resynchronised on the last
//! `TAU/1 ` marker in it, so a partial request left by a dead client costs only itself.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Protocol version.
pub const VERSION: u32 = 1;

/// Marker that starts every request line.
pub const MAGIC: &str = "TAU/1 ";

/// Largest request line, newline included (PIPE_BUF).
pub const MAX_REQUEST: usize = 4096;

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Absolute path of the client's reply FIFO.
    pub reply: String,
    /// Command name.
    pub cmd: String,
    /// Positional arguments (a unit name).
    #[serde(default)]
    pub args: Vec<String>,
    /// Options: `critical`, `history`, `recent`, `unit`, `since`, `stats`, ...
    #[serde(default)]
    pub flags: BTreeMap<String, serde_json::Value>,
}

/// Commands and whether they change anything (these need a root-owned reply FIFO).
pub const COMMANDS: &[(&str, bool)] = &[
    ("health", false),
    ("resources", false),
    ("processes", false),
    ("recovery", false),
    ("logs", false),
    ("config", false),
    ("status", false),
    ("start", true),
    ("stop", true),
    ("restart", true),
    ("reload", true),
    ("safe-mode", true),
    ("poweroff", true),
    ("reboot", true),
    ("reexec", true),
];

/// Is `cmd` a command that changes state? `None` for an unknown command.
pub fn is_mutating(cmd: &str) -> Option<bool> {
    COMMANDS.iter().find(|(c, _)| *c == cmd).map(|&(_, m)| m)
}

/// Why a request line was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The reply path, when it could be recovered (then the client gets the error).
    pub reply: Option<String>,
    pub reason: String,
}

fn reply_hint(text: &str) -> Option<String> {
    // Best effort: find "reply":"..." to tell a client what was wrong with its request.
    let at = text.find("\"reply\"")?;
    let rest = text[at + 7..]
        .trim_start()
        .strip_prefix(':')?
        .trim_start()
        .strip_prefix('"')?;
    let end = rest.find('"')?;
    let p = &rest[..end];
    (p.starts_with('/') && !p.contains('\\')).then(|| p.to_string())
}

fn parse_one(text: &str) -> Result<Request, Rejected> {
    let body = text.strip_prefix(MAGIC).ok_or_else(|| Rejected {
        reply: None,
        reason: "request does not start with TAU/1".into(),
    })?;
    let req: Request = serde_json::from_str(body).map_err(|e| Rejected {
        reply: reply_hint(body),
        reason: format!("malformed request: {e}"),
    })?;
    if !req.reply.starts_with('/') {
        return Err(Rejected {
            reply: None,
            reason: "reply path must be absolute".into(),
        });
    }
    if is_mutating(&req.cmd).is_none() {
        return Err(Rejected {
            reply: Some(req.reply),
            reason: format!("unknown command {:?}", req.cmd),
        });
    }
    Ok(req)
}

/// Parse one request line (without its newline).
pub fn parse_line(line: &[u8]) -> Result<Request, Rejected> {
    if line.len() >= MAX_REQUEST {
        return Err(Rejected {
            reply: None,
            reason: format!("request longer than {MAX_REQUEST} bytes"),
        });
    }
    let text = std::str::from_utf8(line).map_err(|_| Rejected {
        reply: None,
        reason: "request is not UTF-8".into(),
    })?;
    let text = text.trim_end_matches('\r');
    match parse_one(text) {
        Ok(r) => Ok(r),
        Err(first) => match text.rfind(MAGIC) {
            // Garbage or a partial request before a real one: resynchronise on the marker.
            Some(at) if at > 0 => parse_one(&text[at..]).map_err(|_| first),
            _ => Err(first),
        },
    }
}

/// Splits a byte stream into lines, dropping (and counting) lines over [`MAX_REQUEST`].
#[derive(Debug, Default)]
pub struct LineBuffer {
    /// The line being assembled: fixed capacity, never grows past a request's limit.
    buf: heapless::Vec<u8, MAX_REQUEST>,
    /// Discarding the rest of an over-long line.
    skipping: bool,
    /// Over-long lines dropped so far.
    pub oversized: u64,
}

/// One item produced by [`LineBuffer::push`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    Complete(Vec<u8>),
    /// An over-long line was dropped.
    Oversized,
}

impl LineBuffer {
    /// A buffer that continues with `pending`, the unfinished line handed over by a previous
    /// tau-init across re-exec.
    pub fn with_pending(pending: Vec<u8>) -> Self {
        let mut b = Self::default();
        if pending.len() < MAX_REQUEST {
            // Fits: checked above.
            let _ = b.buf.extend_from_slice(&pending);
        }
        b
    }

    /// The unfinished line read so far.
    pub fn pending(&self) -> &[u8] {
        if self.skipping { &[] } else { &self.buf }
    }

    /// Feed bytes; returns the complete lines (and oversize notices) they finish.
    pub fn push(&mut self, data: &[u8]) -> Vec<Line> {
        let mut out = Vec::new();
        for chunk in data.split_inclusive(|&b| b == b'\n') {
            let (body, ends) = match chunk.strip_suffix(b"\n") {
                Some(b) => (b, true),
                None => (chunk, false),
            };
            if !self.skipping {
                // A full line must leave room for nothing more: MAX_REQUEST counts the newline.
                if self.buf.len() + body.len() >= MAX_REQUEST
                    || self.buf.extend_from_slice(body).is_err()
                {
                    self.buf.clear();
                    self.skipping = true;
                    self.oversized += 1;
                    out.push(Line::Oversized);
                }
            }
            if ends {
                if !self.skipping && !self.buf.is_empty() {
                    out.push(Line::Complete(self.buf.to_vec()));
                }
                self.buf.clear();
                self.skipping = false;
            }
        }
        out
    }
}

/// A reply document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub v: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    pub fn ok(data: serde_json::Value) -> Self {
        Self {
            v: VERSION,
            ok: true,
            data: Some(data),
            error: None,
        }
    }
    pub fn err(msg: impl Into<String>) -> Self {
        Self {
            v: VERSION,
            ok: false,
            data: None,
            error: Some(msg.into()),
        }
    }
    /// The reply as bytes on the wire (JSON + newline).
    pub fn to_wire(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).unwrap_or_else(|_| {
            br#"{"v":1,"ok":false,"error":"internal: unserialisable reply"}"#.to_vec()
        });
        v.push(b'\n');
        v
    }
}

/// Encode a request line (client side).
pub fn encode(req: &Request) -> Result<Vec<u8>, String> {
    let mut line = MAGIC.as_bytes().to_vec();
    line.extend(serde_json::to_vec(req).map_err(|e| e.to_string())?);
    line.push(b'\n');
    if line.len() > MAX_REQUEST {
        return Err(format!("request longer than {MAX_REQUEST} bytes"));
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(cmd: &str) -> Request {
        Request {
            reply: "/run/tau/reply/c1".into(),
            cmd: cmd.into(),
            args: vec![],
            flags: BTreeMap::new(),
        }
    }

    #[test]
    fn round_trip() {
        let mut r = req("status");
        r.args.push("tau-session".into());
        r.flags
            .insert("critical".into(), serde_json::Value::Bool(true));
        let wire = encode(&r).unwrap();
        assert!(wire.starts_with(b"TAU/1 {"));
        assert_eq!(parse_line(&wire[..wire.len() - 1]).unwrap(), r);
    }

    #[test]
    fn rejects_with_reasons() {
        assert_eq!(
            parse_line(b"hello").unwrap_err().reason,
            "request does not start with TAU/1"
        );
        assert!(
            parse_line(&[0xff, 0x00, 0x13])
                .unwrap_err()
                .reason
                .contains("UTF-8")
        );
        let e = parse_line(br#"TAU/1 {"reply":"/r/x","cmd":"frobnicate"}"#).unwrap_err();
        assert_eq!(e.reply.as_deref(), Some("/r/x"));
        assert!(e.reason.contains("frobnicate"));
        let e = parse_line(br#"TAU/1 {"reply":"/r/x","cmd":"status","bogus":1}"#).unwrap_err();
        assert_eq!(e.reply.as_deref(), Some("/r/x"));
        assert!(e.reason.contains("bogus"), "{}", e.reason);
        assert!(
            parse_line(br#"TAU/1 {"reply":"rel","cmd":"status"}"#)
                .unwrap_err()
                .reason
                .contains("absolute")
        );
        assert!(
            parse_line(&vec![b'a'; MAX_REQUEST])
                .unwrap_err()
                .reason
                .contains("longer")
        );
    }

    #[test]
    fn partial_request_then_valid_one_resynchronises() {
        let good = encode(&req("status")).unwrap();
        let mut line = br#"TAU/1 {"reply":"/r/dead","cm"#.to_vec();
        line.extend_from_slice(&good[..good.len() - 1]);
        assert_eq!(parse_line(&line).unwrap(), req("status"));
    }

    #[test]
    fn line_buffer_splits_and_drops_oversized() {
        let mut b = LineBuffer::default();
        assert_eq!(b.push(b"ab"), vec![]);
        assert_eq!(
            b.push(b"c\nde\n\nf"),
            vec![
                Line::Complete(b"abc".to_vec()),
                Line::Complete(b"de".to_vec())
            ]
        );
        let big = vec![b'x'; MAX_REQUEST + 10];
        assert_eq!(b.push(&big), vec![Line::Oversized]);
        assert_eq!(
            b.push(b"more-of-the-long-line\nok\n"),
            vec![Line::Complete(b"ok".to_vec())]
        );
        assert_eq!(b.oversized, 1);
    }

    #[test]
    fn random_bytes_never_panic_and_lines_stay_bounded() {
        // xorshift: deterministic garbage, biased towards newlines and the request marker.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut b = LineBuffer::default();
        for _ in 0..2000 {
            let len = (next() % 9000) as usize;
            let mut chunk: Vec<u8> = (0..len)
                .map(|_| match next() % 50 {
                    0 => b'\n',
                    _ => next() as u8,
                })
                .collect();
            if next() % 3 == 0 {
                chunk.extend_from_slice(MAGIC.as_bytes());
                chunk.extend_from_slice(br#"{"reply":"/r/x","cmd":"status"}"#);
            }
            for line in b.push(&chunk) {
                if let Line::Complete(l) = line {
                    assert!(l.len() < MAX_REQUEST);
                    let _ = parse_line(&l);
                }
            }
            assert!(b.pending().len() < MAX_REQUEST);
        }
    }

    #[test]
    fn mutating_table() {
        assert_eq!(is_mutating("status"), Some(false));
        assert_eq!(is_mutating("poweroff"), Some(true));
        assert_eq!(is_mutating("nope"), None);
    }

    #[test]
    fn reply_wire_format() {
        let w = Reply::err("permission denied").to_wire();
        assert_eq!(
            w,
            b"{\"v\":1,\"ok\":false,\"error\":\"permission denied\"}\n"
        );
    }
}
