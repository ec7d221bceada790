//! What the read-only commands answer, built from the supervisor (pure).

use serde::Serialize;
use serde_json::{Value, json};

use crate::supervisor::{Mode, Phase, Supervisor};

/// One row of `status`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct UnitStatus {
    pub name: String,
    /// starting|running|stopping|stopped|backoff|failed
    pub state: &'static str,
    pub pid: Option<i32>,
    pub priority: &'static str,
    pub restarts: u32,
    pub critical: bool,
    pub attempts: u32,
    pub max_attempts: u32,
    pub strategy: &'static str,
    pub safe_mode: bool,
    /// Milliseconds in the current state.
    pub state_ms: u64,
    pub last_exit: Option<String>,
    /// Milliseconds until a restart in `backoff`.
    pub restart_in_ms: Option<u64>,
    pub reason: Option<String>,
    pub description: String,
}

/// Name of a mode.
pub fn mode_str(m: Mode) -> &'static str {
    match m {
        Mode::Normal => "normal",
        Mode::Safe => "safe",
    }
}

/// Status rows, in start order.
pub fn status(s: &Supervisor, now_ms: u64) -> Vec<UnitStatus> {
    s.start_order()
        .iter()
        .map(|&i| {
            let u = &s.units[i];
            let st = &s.states[i];
            UnitStatus {
                name: u.name.clone(),
                state: s.shown_phase(i).as_str(),
                pid: st.pid,
                priority: u.priority.as_str(),
                restarts: st.restarts,
                critical: u.critical,
                attempts: st.attempts,
                max_attempts: u.recovery.max_attempts,
                strategy: u.recovery.strategy.as_str(),
                safe_mode: u.safe_mode,
                state_ms: now_ms.saturating_sub(st.since),
                last_exit: st.last_exit.map(|e| e.to_string()),
                restart_in_ms: st
                    .restart_at
                    .filter(|_| st.phase == Phase::Backoff)
                    .map(|t| t.saturating_sub(now_ms)),
                reason: st.reason.clone(),
                description: u.description.clone(),
            }
        })
        .collect()
}

/// `status` data: mode plus units (optionally one).
pub fn status_data(s: &Supervisor, now_ms: u64, only: Option<&str>) -> Result<Value, String> {
    let mut rows = status(s, now_ms);
    if let Some(name) = only {
        rows.retain(|r| r.name == name);
        if rows.is_empty() {
            return Err(format!("no such unit: {name}"));
        }
    }
    Ok(json!({ "mode": mode_str(s.mode), "shutting_down": s.shutting_down, "units": rows }))
}

/// Resident memory in KiB from a `/proc/<pid>/statm` text (pure).
pub fn statm_rss_kb(statm: &str, page_kb: u64) -> Option<u64> {
    statm
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|p| p * page_kb)
}

/// `processes`: the main process of every unit that has one.
pub fn processes(
    s: &Supervisor,
    now_ms: u64,
    critical_only: bool,
    proc_root: &std::path::Path,
) -> Value {
    let rows: Vec<Value> = s
        .start_order()
        .iter()
        .filter_map(|&i| {
            let u = &s.units[i];
            let st = &s.states[i];
            let pid = st.pid?;
            if critical_only && !u.critical {
                return None;
            }
            let statm = std::fs::read_to_string(proc_root.join(pid.to_string()).join("statm"))
                .unwrap_or_default();
            Some(json!({
                "pid": pid,
                "unit": u.name,
                "state": s.shown_phase(i).as_str(),
                "priority": u.priority.as_str(),
                "critical": u.critical,
                "uptime_ms": now_ms.saturating_sub(st.started_at),
                "rss_kb": statm_rss_kb(&statm, 4),
                "memory_limit_mb": u.memory_limit_mb,
                "cpu_limit_percent": u.cpu_limit_percent,
            }))
        })
        .collect();
    json!({ "processes": rows })
}

/// `recovery`: per-unit recovery state, and the crash history with `history`.
pub fn recovery(s: &Supervisor, history: bool) -> Value {
    let units: Vec<Value> = s
        .start_order()
        .iter()
        .map(|&i| {
            let u = &s.units[i];
            let st = &s.states[i];
            json!({
                "name": u.name,
                "strategy": u.recovery.strategy.as_str(),
                "critical": u.critical,
                "attempts": st.attempts,
                "max_attempts": u.recovery.max_attempts,
                "restarts": st.restarts,
                "last_exit": st.last_exit.map(|e| e.to_string()),
                "state": s.shown_phase(i).as_str(),
            })
        })
        .collect();
    let mut v =
        json!({ "mode": mode_str(s.mode), "crashes_recorded": s.crashes.len(), "units": units });
    if history {
        v["history"] = json!(s.crashes);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statm_parsing() {
        assert_eq!(statm_rss_kb("2000 300 100 1 0 50 0\n", 4), Some(1200));
        assert_eq!(statm_rss_kb("garbage", 4), None);
        assert_eq!(statm_rss_kb("", 4), None);
    }
}

/// The effective config for `taucli config`: every `section.key` with its value and where it
/// came from (`default`, `file`, or an override such as `command line`).
pub fn config_view(
    cfg: &crate::config::Config,
    file: &std::path::Path,
    file_text: Option<&str>,
    overrides: &[(&str, &str)],
) -> Value {
    let in_file: Option<toml::Table> = file_text.and_then(|t| t.parse::<toml::Table>().ok());
    let mut values = serde_json::Map::new();
    if let Ok(Value::Object(sections)) = serde_json::to_value(cfg) {
        for (section, body) in sections {
            let Value::Object(keys) = body else { continue };
            for (key, value) in keys {
                let path = format!("{section}.{key}");
                let from_file = in_file
                    .as_ref()
                    .and_then(|t| t.get(&section))
                    .and_then(|s| s.as_table())
                    .is_some_and(|s| s.contains_key(&key));
                let source = overrides
                    .iter()
                    .find(|(k, _)| *k == path)
                    .map(|(_, s)| s.to_string())
                    .unwrap_or_else(|| {
                        if from_file {
                            "file".into()
                        } else {
                            "default".into()
                        }
                    });
                values.insert(path, json!({ "value": value, "source": source }));
            }
        }
    }
    json!({ "file": file.display().to_string(), "file_loaded": in_file.is_some(), "values": values })
}

#[cfg(test)]
mod config_view_tests {
    use super::*;

    #[test]
    fn sources_are_default_file_and_override() {
        let text = "[crash_recovery]\nmax_recovery_attempts = 5\n";
        let cfg = crate::config::parse_config(text, std::path::Path::new("/t.toml")).unwrap();
        let v = config_view(
            &cfg,
            std::path::Path::new("/t.toml"),
            Some(text),
            &[("system.run_dir", "command line")],
        );
        let vals = &v["values"];
        assert_eq!(vals["crash_recovery.max_recovery_attempts"]["value"], 5);
        assert_eq!(
            vals["crash_recovery.max_recovery_attempts"]["source"],
            "file"
        );
        assert_eq!(
            vals["crash_recovery.recovery_timeout_seconds"]["source"],
            "default"
        );
        assert_eq!(vals["system.run_dir"]["source"], "command line");
        assert_eq!(v["file_loaded"], true);
    }
}
