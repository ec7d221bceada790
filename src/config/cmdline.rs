//! Parser of the kernel command line (`/proc/cmdline`): the `tau.*` options and the classic
//! single-user words.

use std::path::PathBuf;

/// What PID 1 does when it cannot go on (e.g. no critical unit can be started).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CrashAction {
    /// Start an emergency shell on the console.
    #[default]
    Shell,
    /// Reboot the machine.
    Reboot,
    /// Power the machine off.
    Poweroff,
    /// Stop doing anything (leave the console for inspection).
    Freeze,
}

/// The options tau-init takes from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Cmdline {
    /// `tau.mode=safe`, `single`, `emergency`, `S` or `-s` (the last mode word wins).
    pub safe_mode: bool,
    /// `tau.config=PATH`: configuration file instead of the default.
    pub config: Option<PathBuf>,
    /// `tau.units=DIR`: unit directory instead of `[system] units_dir`.
    pub units: Option<PathBuf>,
    /// `tau.log=LEVEL`: one of error, warn, info, debug.
    pub log: Option<String>,
    /// `tau.crash=shell|reboot|poweroff|freeze`.
    pub crash: CrashAction,
    /// Unrecognised or invalid `tau.*` words, one message each (never fatal).
    pub warnings: Vec<String>,
}

/// Parses `/proc/cmdline` contents. Never fails: problems become [`Cmdline::warnings`].
pub fn parse_cmdline(s: &str) -> Cmdline {
    let mut out = Cmdline::default();
    for word in split_words(s) {
        match word.as_str() {
            "single" | "emergency" | "S" | "-s" => {
                out.safe_mode = true;
                continue;
            }
            _ => {}
        }
        let Some(rest) = word.strip_prefix("tau.") else {
            continue;
        };
        let (key, value) = match rest.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (rest, None),
        };
        match (key, value) {
            ("mode", Some("safe")) => out.safe_mode = true,
            ("mode", Some("normal")) => out.safe_mode = false,
            ("config", Some(v)) => out.config = absolute(&word, v, &mut out.warnings),
            ("units", Some(v)) => out.units = absolute(&word, v, &mut out.warnings),
            ("log", Some(v @ ("error" | "warn" | "info" | "debug"))) => {
                out.log = Some(v.to_string())
            }
            ("crash", Some(v)) => match crash_action(v) {
                Some(action) => out.crash = action,
                None => out.warnings.push(format!(
                    "`{word}`: unknown crash action, expected shell, reboot, poweroff or freeze"
                )),
            },
            ("mode", _) => out
                .warnings
                .push(format!("`{word}`: unknown mode, expected safe or normal")),
            ("log", _) => out.warnings.push(format!(
                "`{word}`: unknown log level, expected error, warn, info or debug"
            )),
            ("config" | "units", None) => out.warnings.push(format!("`{word}`: missing value")),
            _ => out
                .warnings
                .push(format!("`{word}`: unknown tau option, ignored")),
        }
    }
    out
}

fn crash_action(v: &str) -> Option<CrashAction> {
    Some(match v {
        "shell" => CrashAction::Shell,
        "reboot" => CrashAction::Reboot,
        "poweroff" => CrashAction::Poweroff,
        "freeze" => CrashAction::Freeze,
        _ => return None,
    })
}

/// `Some(path)` when `v` is an absolute path, else a warning and `None`.
fn absolute(word: &str, v: &str, warnings: &mut Vec<String>) -> Option<PathBuf> {
    if v.starts_with('/') {
        Some(PathBuf::from(v))
    } else {
        warnings.push(format!("`{word}`: path must be absolute, ignored"));
        None
    }
}

/// Splits on whitespace; a double quote toggles quoting and is removed (`key="a b"`).
fn split_words(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quoted = false;
    for c in s.chars() {
        if c == '"' {
            quoted = !quoted;
            in_word = true;
        } else if c.is_whitespace() && !quoted {
            if in_word {
                words.push(std::mem::take(&mut cur));
                in_word = false;
            }
        } else {
            cur.push(c);
            in_word = true;
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_gives_defaults() {
        let c = parse_cmdline("");
        assert_eq!(c, Cmdline::default());
        assert_eq!(c.crash, CrashAction::Shell);
        assert!(!c.safe_mode);
    }

    #[test]
    fn typical_line_without_tau_words() {
        let c = parse_cmdline("BOOT_IMAGE=/vmlinuz root=/dev/vda1 ro quiet console=ttyS0\n");
        assert_eq!(c, Cmdline::default());
    }

    #[test]
    fn safe_mode_words() {
        for w in ["tau.mode=safe", "single", "emergency", "S", "-s"] {
            assert!(parse_cmdline(&format!("ro {w} quiet")).safe_mode, "{w}");
        }
        assert!(!parse_cmdline("s").safe_mode);
        assert!(!parse_cmdline("singles").safe_mode);
        assert!(!parse_cmdline("single tau.mode=normal").safe_mode);
        assert!(parse_cmdline("tau.mode=normal single").safe_mode);
    }

    #[test]
    fn paths_level_and_crash() {
        let c = parse_cmdline(
            "tau.config=/etc/tau/alt.toml tau.units=/etc/tau/units.d tau.log=debug tau.crash=reboot",
        );
        assert_eq!(c.config, Some(PathBuf::from("/etc/tau/alt.toml")));
        assert_eq!(c.units, Some(PathBuf::from("/etc/tau/units.d")));
        assert_eq!(c.log.as_deref(), Some("debug"));
        assert_eq!(c.crash, CrashAction::Reboot);
        assert!(c.warnings.is_empty());
        assert_eq!(
            parse_cmdline("tau.crash=poweroff").crash,
            CrashAction::Poweroff
        );
        assert_eq!(parse_cmdline("tau.crash=freeze").crash, CrashAction::Freeze);
        assert_eq!(
            parse_cmdline("tau.crash=reboot tau.crash=shell").crash,
            CrashAction::Shell
        );
    }

    #[test]
    fn quoted_value() {
        let c = parse_cmdline(r#"ro tau.config="/etc/my tau/tau.toml" quiet"#);
        assert_eq!(c.config, Some(PathBuf::from("/etc/my tau/tau.toml")));
        assert!(c.warnings.is_empty());
        assert_eq!(split_words(r#"a "b c" d="" "#), vec!["a", "b c", "d="]);
    }

    #[test]
    fn bad_values_are_warnings() {
        let c = parse_cmdline(
            "tau.log=verbose tau.crash=explode tau.mode=fast tau.units=rel/dir tau.config",
        );
        assert_eq!(c.log, None);
        assert_eq!(c.crash, CrashAction::Shell);
        assert!(!c.safe_mode);
        assert_eq!(c.units, None);
        assert_eq!(c.config, None);
        assert_eq!(c.warnings.len(), 5, "{:?}", c.warnings);
        assert!(c.warnings[0].contains("tau.log=verbose"));
        assert!(c.warnings[1].contains("tau.crash=explode"));
        assert!(c.warnings[2].contains("tau.mode=fast"));
        assert!(c.warnings[3].contains("tau.units=rel/dir"));
        assert!(c.warnings[4].contains("tau.config"));
    }

    #[test]
    fn unknown_tau_word_is_warning_naming_it() {
        let c = parse_cmdline("quiet tau.frobnicate=1 tau.debug");
        assert_eq!(
            c.warnings,
            vec![
                "`tau.frobnicate=1`: unknown tau option, ignored".to_string(),
                "`tau.debug`: unknown tau option, ignored".to_string()
            ]
        );
        assert!(parse_cmdline("other.thing=1 taux=2").warnings.is_empty());
    }
}
