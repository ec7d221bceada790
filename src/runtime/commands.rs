//! Control commands as the loop carries them out: read requests, check the caller, answer,
//! audit, and act (after the reply is on its way for power-off, reboot and re-exec).

use std::io::Write;

use mio::unix::SourceFd;
use mio::{Interest, Token};
use serde_json::{Value, json};

use super::{Key, REPLY_BASE, Runtime, Shutdown, now};
use crate::control::protocol::{Reply, Request, is_mutating};
use crate::control::server::{Incoming, Pending, REPLY_TIMEOUT_MS, Received};
use crate::control::view;
use crate::log;
use crate::supervisor::Event;

/// What to do once the reply has been written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    Shutdown(Shutdown),
    Reexec,
}

/// Rejected requests logged one by one per wake-up; the rest are counted in one line.
const MAX_REJECT_LOGS: usize = 8;

/// Most log records one `logs` request returns.
const MAX_LOG_RECORDS: usize = 1000;

impl Runtime {
    pub(super) fn on_control(&mut self) {
        let Some(server) = self.control.as_mut() else {
            return;
        };
        let (items, more) = server.receive();
        self.control_backlog = more;
        // A flood of bad requests must not become a flood of console lines.
        let mut rejected = 0usize;
        for item in items {
            match item {
                Received::Request(inc) => self.command(inc),
                Received::Rejected { reason, reply } => {
                    rejected += 1;
                    // Every one is kept in the log ring; only the first few reach the console.
                    let level = if rejected <= MAX_REJECT_LOGS {
                        log::Level::Warn
                    } else {
                        log::Level::Debug
                    };
                    log::log(level, None, &format!("control: rejected request: {reason}"));
                    if let Some(f) = reply {
                        self.send(f, &Reply::err(reason));
                    }
                }
            }
        }
        if rejected > MAX_REJECT_LOGS {
            log::warn(&format!(
                "control: {} more requests rejected (see taucli logs)",
                rejected - MAX_REJECT_LOGS
            ));
        }
    }

    fn command(&mut self, inc: Incoming) {
        let Incoming { req, uid, reply } = inc;
        let mutating = is_mutating(&req.cmd).unwrap_or(true);
        let result = if mutating && uid != 0 {
            Err(format!(
                "permission denied: {} needs root (reply FIFO owned by uid {uid})",
                req.cmd
            ))
        } else {
            self.execute(&req, uid)
        };
        if mutating {
            self.audit(uid, &req, &result);
        }
        let r = match result {
            Ok(v) => Reply::ok(v),
            Err(e) => Reply::err(e),
        };
        self.send(reply, &r);
    }

    fn unit_arg(&self, req: &Request) -> Result<usize, String> {
        let name = req
            .args
            .first()
            .ok_or_else(|| format!("{} needs a unit name", req.cmd))?;
        self.sup
            .find(name)
            .ok_or_else(|| format!("no such unit: {name}"))
    }

    fn execute(&mut self, req: &Request, uid: u32) -> Result<Value, String> {
        let flag_bool = |k: &str| req.flags.get(k).and_then(Value::as_bool).unwrap_or(false);
        let t = now();
        match req.cmd.as_str() {
            "status" => view::status_data(&self.sup, t.mono, req.args.first().map(String::as_str))
                .map(|mut v| {
                    v["orphans_reaped"] = json!(self.orphans_reaped);
                    v["handler_panics"] = json!(self.handler_panics);
                    v
                }),
            "processes" => Ok(view::processes(
                &self.sup,
                t.mono,
                flag_bool("critical"),
                std::path::Path::new("/proc"),
            )),
            "recovery" => Ok(view::recovery(&self.sup, flag_bool("history"))),
            "logs" => Ok(self.logs(req)),
            "config" => Ok(self.setup.config_view.clone()),
            "health" | "resources" => {
                Err("not available yet: this tau-init has no resource monitoring".to_string())
            }
            "start" | "stop" | "restart" => {
                if self.shutdown.is_some() {
                    return Err("shutting down".into());
                }
                let i = self.unit_arg(req)?;
                let ev = match req.cmd.as_str() {
                    "start" => Event::Start(i),
                    "stop" => Event::Stop(i),
                    _ => Event::Restart(i),
                };
                self.dispatch(ev);
                let name = self.sup.units[i].name.clone();
                Ok(json!({ "unit": name, "state": self.sup.shown_phase(i).as_str() }))
            }
            "reload" => self.reload(),
            "safe-mode" => {
                self.dispatch(Event::EnterSafeMode {
                    reason: format!("requested by uid {uid}"),
                });
                Ok(json!({ "mode": view::mode_str(self.sup.mode) }))
            }
            "poweroff" | "reboot" => {
                let kind = if req.cmd == "poweroff" {
                    Shutdown::Poweroff
                } else {
                    Shutdown::Reboot
                };
                self.after_reply = Some(After::Shutdown(kind));
                Ok(json!({ "shutdown": req.cmd }))
            }
            "reexec" => {
                if self.shutdown.is_some() {
                    return Err("shutting down".into());
                }
                self.after_reply = Some(After::Reexec);
                Ok(json!({ "reexec": true, "units": self.sup.units.len() }))
            }
            other => Err(format!("unknown command {other:?}")),
        }
    }

    fn logs(&self, req: &Request) -> Value {
        let f = &req.flags;
        if f.get("stats").and_then(Value::as_bool).unwrap_or(false) {
            let (counts, dropped, kept, last_seq) = log::stats();
            return json!({
                "stats": {
                    "error": counts[0], "warn": counts[1], "info": counts[2], "debug": counts[3],
                    "kept": kept, "dropped": dropped, "capacity": log::RING, "last_seq": last_seq,
                    "console_dropped": log::console_dropped(),
                }
            });
        }
        let n = f
            .get("recent")
            .and_then(Value::as_u64)
            .unwrap_or(20)
            .min(MAX_LOG_RECORDS as u64) as usize;
        let since = f.get("since").and_then(Value::as_u64).unwrap_or(0);
        let unit = f.get("unit").and_then(Value::as_str);
        let records = log::recent(n, unit, since);
        let (_, _, _, last_seq) = log::stats();
        json!({ "records": records, "last_seq": last_seq })
    }

    fn audit(&self, uid: u32, req: &Request, result: &Result<Value, String>) {
        let line = json!({
            "time_ms": crate::sys::wall_ms(),
            "uid": uid,
            "command": req.cmd,
            "args": req.args,
            "result": match result { Ok(_) => "ok".to_string(), Err(e) => format!("error: {e}") },
        });
        let level = if result.is_ok() {
            log::Level::Info
        } else {
            log::Level::Debug
        };
        log::log(
            level,
            None,
            &format!(
                "audit: uid {uid} {} {} -> {}",
                req.cmd,
                req.args.join(" "),
                line["result"].as_str().unwrap_or("")
            ),
        );
        let path = &self.audit_log;
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        // What was done is made durable; a denied attempt is written but not fsynced, so a
        // flood of them cannot stall the loop on the disk.
        let executed = result.is_ok();
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| {
                f.write_all(format!("{line}\n").as_bytes())?;
                if executed { f.sync_data() } else { Ok(()) }
            });
        if let Err(e) = written {
            log::warn(&format!("audit log {}: {e}", path.display()));
        }
    }

    /// Write a reply now, or park it until the reader drains the pipe (bounded by a timeout).
    fn send(&mut self, file: std::fs::File, reply: &Reply) {
        let mut p = Pending {
            file,
            data: reply.to_wire(),
            written: 0,
            deadline: 0,
        };
        match p.flush() {
            Ok(true) => {}
            Ok(false) => {
                let id = self.next_reply;
                self.next_reply += 1;
                let token = Token(REPLY_BASE + (id as usize % (usize::MAX - REPLY_BASE)));
                use std::os::fd::AsRawFd;
                let fd = p.file.as_raw_fd();
                if self
                    .poll
                    .registry()
                    .register(&mut SourceFd(&fd), token, Interest::WRITABLE)
                    .is_err()
                {
                    log::warn("control: cannot wait for a slow reader; reply dropped");
                    return;
                }
                p.deadline = crate::sys::monotonic_ms().saturating_add(REPLY_TIMEOUT_MS);
                self.timers.set(Key::Reply(id), p.deadline);
                self.replies.insert(id, p);
            }
            Err(e) => log::debug(&format!("control: reply not delivered: {e}")),
        }
    }

    pub(super) fn flush_reply(&mut self, id: u64) {
        let Some(p) = self.replies.get_mut(&id) else {
            return;
        };
        let result = p.flush();
        match result {
            Ok(false) => {}
            Ok(true) => self.drop_reply(id, ""),
            Err(e) => self.drop_reply(id, e.as_str()),
        }
    }

    pub(super) fn drop_reply(&mut self, id: u64, why: &str) {
        if let Some(p) = self.replies.remove(&id) {
            use std::os::fd::AsRawFd;
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&p.file.as_raw_fd()));
            self.timers.cancel(Key::Reply(id));
            if !why.is_empty() {
                log::warn(&format!(
                    "control: reply dropped after {} of {} bytes: {why}",
                    p.written,
                    p.data.len()
                ));
            }
        }
    }

    pub(super) fn after(&mut self, a: After) {
        match a {
            After::Shutdown(kind) => self.begin_shutdown(kind),
            After::Reexec => self.reexec(),
        }
    }

    /// Re-read the units directory; apply only when every unit file is valid.
    fn reload(&mut self) -> Result<Value, String> {
        if self.shutdown.is_some() {
            return Err("shutting down".into());
        }
        let (units, diags) =
            super::load_unit_set(&self.setup.units_dir, &self.setup.config, self.setup.booted);
        if !diags.is_empty() {
            let list: Vec<String> = diags.iter().map(|d| d.to_string()).collect();
            return Err(format!(
                "reload refused, nothing changed:\n{}",
                list.join("\n")
            ));
        }
        let (next, plan) = self.sup.reloaded(units);
        let old = std::mem::replace(&mut self.sup, next);
        // Move pids and timers to the new indices.
        let pids: Vec<(i32, usize)> = self.pids.drain().collect();
        for (pid, i) in pids {
            if let Some(Some(n)) = plan.remap.get(i) {
                self.pids.insert(pid, *n);
            }
        }
        for (key, at) in self.timers.take_if(|k| matches!(k, Key::Unit(..))) {
            if let Key::Unit(i, kind) = key
                && let Some(Some(n)) = plan.remap.get(i)
            {
                self.timers.set(Key::Unit(*n, kind), at);
            }
        }
        for r in &plan.removed {
            if let Some(pid) = r.pid {
                log::info(&format!(
                    "{}: removed by reload, stopping pid {pid}",
                    r.name
                ));
                if crate::sys::kill(-pid, r.stop_signal).is_err() {
                    let _ = crate::sys::kill(pid, r.stop_signal);
                }
                self.timers.set(
                    Key::RemovedKill(pid),
                    crate::sys::monotonic_ms().saturating_add(r.stop_timeout_ms),
                );
            }
        }
        for &i in &plan.changed {
            if self.sup.states[i].is_up() {
                self.dispatch(Event::Restart(i));
            }
        }
        for &i in &plan.added {
            if self.sup.units[i].enabled {
                self.dispatch(Event::Start(i));
            }
        }
        drop(old);
        let names = |v: &[usize]| -> Vec<String> {
            v.iter().map(|&i| self.sup.units[i].name.clone()).collect()
        };
        let removed: Vec<&str> = plan.removed.iter().map(|r| r.name.as_str()).collect();
        log::info(&format!(
            "reload: {} added, {} changed, {} removed, {} unchanged",
            plan.added.len(),
            plan.changed.len(),
            plan.removed.len(),
            plan.unchanged.len()
        ));
        Ok(json!({
            "added": names(&plan.added),
            "changed": names(&plan.changed),
            "removed": removed,
            "unchanged": names(&plan.unchanged),
        }))
    }
}
