//! tau-init's own durable state (crash history, failure counters), saved atomically (temp file,
//! fsync, rename, fsync of the directory) and reloaded at start. A torn or corrupt file is set
//! aside and reported, never fatal.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::supervisor::{CrashRecord, ExitInfo, Supervisor};

/// File name inside `[system] state_dir`.
pub const STATE_FILE: &str = "tau-init.state.json";

/// Format version of the state file.
pub const VERSION: u32 = 1;

/// Counters of one unit that survive restarts of tau-init and reboots.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UnitCounters {
    pub attempts: u32,
    pub restarts: u32,
    pub last_exit: Option<ExitInfo>,
}

/// The durable state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Durable {
    pub version: u32,
    pub crashes: Vec<CrashRecord>,
    pub units: BTreeMap<String, UnitCounters>,
}

impl Durable {
    /// Snapshot of a supervisor.
    pub fn from_supervisor(s: &Supervisor) -> Self {
        let units = s
            .units
            .iter()
            .zip(&s.states)
            .map(|(u, st)| {
                (
                    u.name.clone(),
                    UnitCounters {
                        attempts: st.attempts,
                        restarts: st.restarts,
                        last_exit: st.last_exit,
                    },
                )
            })
            .collect();
        Self {
            version: VERSION,
            crashes: s.crashes.iter().cloned().collect(),
            units,
        }
    }

    /// Restore counters and history into a fresh supervisor (units no longer present are
    /// dropped). A unit that had given up (more failures than `max_attempts`) gets a fresh
    /// count: a reboot is a new chance. Counts below that carry over, so a unit that crashes
    /// on every boot still runs out of attempts.
    pub fn apply(&self, s: &mut Supervisor) {
        for (i, u) in s.units.iter().enumerate() {
            if let Some(c) = self.units.get(&u.name) {
                s.states[i].attempts = if c.attempts > u.recovery.max_attempts {
                    0
                } else {
                    c.attempts
                };
                s.states[i].restarts = c.restarts;
                s.states[i].last_exit = c.last_exit;
            }
        }
        s.crashes = self
            .crashes
            .iter()
            .rev()
            .take(crate::supervisor::CRASH_HISTORY)
            .rev()
            .cloned()
            .collect();
    }
}

/// Parse the state file contents.
pub fn parse(text: &str) -> Result<Durable, String> {
    let d: Durable = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if d.version != VERSION {
        return Err(format!(
            "unsupported version {} (expected {VERSION})",
            d.version
        ));
    }
    Ok(d)
}

/// Write `data` to `path` atomically: `path.tmp`, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Save the durable state into `dir`.
pub fn save(dir: &Path, d: &Durable) -> Result<(), String> {
    let json = serde_json::to_vec_pretty(d).map_err(|e| e.to_string())?;
    write_atomic(&dir.join(STATE_FILE), &json)
        .map_err(|e| format!("{}: {e}", dir.join(STATE_FILE).display()))
}

/// Outcome of loading the state file.
#[derive(Debug)]
pub enum Loaded {
    /// No file yet.
    Missing,
    Ok(Durable),
    /// Unreadable or corrupt: moved aside to the returned path.
    SetAside {
        reason: String,
        moved_to: Option<PathBuf>,
    },
}

/// Load the durable state from `dir`; a corrupt file is renamed to `*.corrupt.<wall-ms>`.
pub fn load(dir: &Path) -> Loaded {
    let path = dir.join(STATE_FILE);
    let text = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Loaded::Missing,
        Err(e) => {
            return Loaded::SetAside {
                reason: format!("{}: {e}", path.display()),
                moved_to: None,
            };
        }
    };
    let parsed = std::str::from_utf8(&text)
        .map_err(|e| e.to_string())
        .and_then(parse);
    match parsed {
        Ok(d) => Loaded::Ok(d),
        Err(reason) => {
            let aside = path.with_extension(format!("corrupt.{}", crate::sys::wall_ms()));
            let moved_to = fs::rename(&path, &aside).ok().map(|_| aside);
            Loaded::SetAside {
                reason: format!("{}: {reason}", path.display()),
                moved_to,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tau-persist-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn sample() -> Durable {
        let mut d = Durable {
            version: VERSION,
            ..Default::default()
        };
        d.units.insert(
            "a".into(),
            UnitCounters {
                attempts: 2,
                restarts: 5,
                last_exit: Some(ExitInfo::Exited { code: 3 }),
            },
        );
        d.crashes.push(CrashRecord {
            unit: "a".into(),
            time_ms: 1,
            exit: ExitInfo::Signaled {
                signal: 11,
                core_dumped: true,
            },
            core_dumped: true,
            uptime_ms: 20,
            attempt: 2,
            action: "restart".into(),
        });
        d
    }

    #[test]
    fn round_trip_through_disk() {
        let dir = tmpdir("rt");
        save(&dir, &sample()).unwrap();
        match load(&dir) {
            Loaded::Ok(d) => assert_eq!(d, sample()),
            other => panic!("{other:?}"),
        }
        assert!(!dir.join("tau-init.state.tmp").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn torn_file_is_set_aside_not_fatal() {
        let dir = tmpdir("torn");
        let json = serde_json::to_string(&sample()).unwrap();
        fs::write(dir.join(STATE_FILE), &json[..json.len() / 2]).unwrap();
        match load(&dir) {
            Loaded::SetAside {
                moved_to: Some(p),
                reason,
            } => {
                assert!(p.exists(), "{p:?}");
                assert!(reason.contains(STATE_FILE), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(load(&dir), Loaded::Missing));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn apply_carries_counts_but_gives_a_unit_that_gave_up_a_fresh_start() {
        let toml = |n: &str| format!("exec = [\"/bin/true\"]\n# {n}\n");
        let cfg = crate::config::Config::default();
        let mk =
            |n: &str| crate::config::parse_unit(n, &toml(n), Path::new("/u.toml"), &cfg).unwrap();
        let mut sup = Supervisor::new(vec![mk("a"), mk("b")], true, 10);
        let mut d = sample();
        d.units.insert(
            "b".into(),
            UnitCounters {
                attempts: 4,
                restarts: 9,
                last_exit: None,
            },
        );
        d.apply(&mut sup);
        let a = sup.find("a").unwrap();
        let b = sup.find("b").unwrap();
        assert_eq!((sup.states[a].attempts, sup.states[a].restarts), (2, 5));
        assert_eq!((sup.states[b].attempts, sup.states[b].restarts), (0, 9));
        assert_eq!(sup.crashes.len(), 1);
    }

    #[test]
    fn wrong_version_and_missing() {
        assert!(
            parse(r#"{"version":99,"crashes":[],"units":{}}"#)
                .unwrap_err()
                .contains("version 99")
        );
        assert!(matches!(
            load(Path::new("/nonexistent-tau-dir")),
            Loaded::Missing
        ));
    }
}
