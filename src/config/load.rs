//! Loading and validating `tau.toml` and unit files.
//!
//! Everything that parses takes `&str` and returns every problem found as a located
//! [`Diagnostic`]; only [`load_config`], [`load_units`], [`check_executable`] and
//! [`IdDb::system`] touch the filesystem. Nothing here panics on input.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use nix::sys::signal::Signal;

use super::diag::{Diagnostic, io_message};
use super::model::{Config, Priority, Recovery, Unit, UnitFile};

/// Accepted values of `[system] log_level` (and `tau.log=`).
pub const LOG_LEVELS: [&str; 4] = ["error", "warn", "info", "debug"];

/// Default `[recovery] delay_ms`.
pub const DEFAULT_DELAY_MS: u64 = 1000;
/// Default `[recovery] backoff_initial_ms`.
pub const DEFAULT_BACKOFF_INITIAL_MS: u64 = 500;
/// Default `[recovery] backoff_max_ms`.
pub const DEFAULT_BACKOFF_MAX_MS: u64 = 30_000;
/// Default `[recovery] backoff_factor`.
pub const DEFAULT_BACKOFF_FACTOR: f64 = 2.0;
/// Default `stop_timeout_ms`.
pub const DEFAULT_STOP_TIMEOUT_MS: u64 = 5000;
/// Default `ready_timeout_ms`.
pub const DEFAULT_READY_TIMEOUT_MS: u64 = 30_000;

// ---------------------------------------------------------------------------------------------
// tau.toml
// ---------------------------------------------------------------------------------------------

/// Parses and validates the text of `tau.toml` (`file` is only used in diagnostics).
pub fn parse_config(text: &str, file: &Path) -> Result<Config, Vec<Diagnostic>> {
    let cfg: Config = toml::from_str(text).map_err(|e| vec![toml_diagnostic(&e, text, file)])?;
    let mut c = Checker::new(text, file);
    check_config(&cfg, &mut c);
    c.finish(cfg)
}

/// Reads and validates `path`; a missing file is an error.
pub fn load_config(path: &Path) -> Result<Config, Vec<Diagnostic>> {
    load_config_or_default(path, true)
}

/// Like [`load_config`], but when `must_exist` is false a missing file gives `Config::default()`.
pub fn load_config_or_default(path: &Path, must_exist: bool) -> Result<Config, Vec<Diagnostic>> {
    match fs::read_to_string(path) {
        Ok(text) => parse_config(&text, path),
        Err(e) if e.kind() == io::ErrorKind::NotFound && !must_exist => Ok(Config::default()),
        Err(e) => Err(vec![read_error(path, "config file", &e)]),
    }
}

fn check_config(cfg: &Config, c: &mut Checker) {
    let s = &cfg.system;
    if !LOG_LEVELS.contains(&s.log_level.as_str()) {
        c.err(
            "system",
            "log_level",
            format!(
                "`system.log_level` must be error, warn, info or debug, found `{}`",
                s.log_level
            ),
        );
    }
    for (key, path) in [
        ("units_dir", &s.units_dir),
        ("run_dir", &s.run_dir),
        ("state_dir", &s.state_dir),
        ("module_dir", &s.module_dir),
        ("persistent_mount", &s.persistent_mount),
        ("cgroup_root", &s.cgroup_root),
        ("audit_log", &s.audit_log),
    ] {
        c.absolute("system", key, path);
    }
    if s.modules.iter().any(|m| m.is_empty()) {
        c.err(
            "system",
            "modules",
            "`system.modules` must not contain empty entries".into(),
        );
    }

    let r = &cfg.resource_monitoring;
    c.positive(
        "resource_monitoring",
        "interval_seconds",
        r.interval_seconds,
    );
    c.percent(
        "resource_monitoring",
        "cpu_threshold_percent",
        r.cpu_threshold_percent,
    );
    c.percent(
        "resource_monitoring",
        "memory_threshold_percent",
        r.memory_threshold_percent,
    );
    c.percent(
        "resource_monitoring",
        "disk_threshold_percent",
        r.disk_threshold_percent,
    );

    let p = &cfg.process_management;
    c.positive(
        "process_management",
        "max_concurrent_processes",
        p.max_concurrent_processes.into(),
    );
    if p.process_priority_levels != 5 {
        c.err(
            "process_management",
            "process_priority_levels",
            format!(
                "`process_management.process_priority_levels` must be 5, found {}",
                p.process_priority_levels
            ),
        );
    }
    c.percent(
        "process_management",
        "cpu_limit_percent",
        p.cpu_limit_percent,
    );

    let k = &cfg.crash_recovery;
    c.positive(
        "crash_recovery",
        "max_recovery_attempts",
        k.max_recovery_attempts.into(),
    );
    c.absolute(
        "crash_recovery",
        "session_state_path",
        &k.session_state_path,
    );
    for name in k.critical_processes.iter().filter(|n| !valid_unit_name(n)) {
        c.err(
            "crash_recovery",
            "critical_processes",
            format!("`crash_recovery.critical_processes`: invalid unit name `{name}`"),
        );
    }

    let h = &cfg.health_checking;
    c.positive(
        "health_checking",
        "check_interval_seconds",
        h.check_interval_seconds,
    );
    if !(0.0..=1.0).contains(&h.health_score_threshold) {
        c.err(
            "health_checking",
            "health_score_threshold",
            format!(
                "`health_checking.health_score_threshold` must be between 0.0 and 1.0, found {}",
                h.health_score_threshold
            ),
        );
    }
}

/// Collects semantic errors, each located at its key in the text.
struct Checker<'a> {
    text: &'a str,
    file: &'a Path,
    diags: Vec<Diagnostic>,
}

impl<'a> Checker<'a> {
    fn new(text: &'a str, file: &'a Path) -> Self {
        Self {
            text,
            file,
            diags: Vec::new(),
        }
    }

    fn err(&mut self, section: &str, key: &str, message: String) {
        let (line, col) = locate_key(self.text, section, key);
        self.diags
            .push(Diagnostic::new(self.file, line, col, message));
    }

    fn positive(&mut self, section: &str, key: &str, value: u64) {
        if value == 0 {
            self.err(
                section,
                key,
                format!("`{}` must be greater than 0", dotted(section, key)),
            );
        }
    }

    fn percent(&mut self, section: &str, key: &str, value: f64) {
        if !(0.0..=100.0).contains(&value) {
            let msg = format!(
                "`{}` must be between 0 and 100, found {value}",
                dotted(section, key)
            );
            self.err(section, key, msg);
        }
    }

    fn absolute(&mut self, section: &str, key: &str, path: &Path) {
        if !path.is_absolute() {
            let msg = format!(
                "`{}` must be an absolute path, found `{}`",
                dotted(section, key),
                path.display()
            );
            self.err(section, key, msg);
        }
    }

    fn finish<T>(self, value: T) -> Result<T, Vec<Diagnostic>> {
        if self.diags.is_empty() {
            Ok(value)
        } else {
            Err(self.diags)
        }
    }
}

fn dotted(section: &str, key: &str) -> String {
    if section.is_empty() {
        key.to_string()
    } else {
        format!("{section}.{key}")
    }
}

// ---------------------------------------------------------------------------------------------
// Locations
// ---------------------------------------------------------------------------------------------

/// 1-based `(line, col)` of `key = ...` inside `[section]` (`""`: the top-level table).
///
/// Falls back to the `[section]` header, then to a top-level `section = ...` (inline table),
/// then to 1:1. A heuristic over lines: good enough to point a human at the right place.
pub fn locate_key(text: &str, section: &str, key: &str) -> (usize, usize) {
    let dotted_key = format!("{section}.{key}");
    let mut current = String::new();
    let mut header = None;
    let mut inline = None;
    for (i, raw) in text.lines().enumerate() {
        let trimmed = raw.trim_start();
        let col = raw.chars().count() - trimmed.chars().count() + 1;
        if let Some(name) = header_name(trimmed) {
            current = name;
            if current == section && header.is_none() {
                header = Some((i + 1, col));
            }
            continue;
        }
        if current == section && starts_with_key(trimmed, key) {
            return (i + 1, col);
        }
        if current.is_empty() && !section.is_empty() {
            if starts_with_key(trimmed, &dotted_key) {
                return (i + 1, col);
            }
            if inline.is_none() && starts_with_key(trimmed, section) {
                inline = Some((i + 1, col));
            }
        }
    }
    header.or(inline).unwrap_or((1, 1))
}

/// The table name of a `[name]` / `[[name]]` header line.
fn header_name(trimmed: &str) -> Option<String> {
    let inner = trimmed.strip_prefix('[')?;
    let inner = inner.strip_prefix('[').unwrap_or(inner);
    let end = inner.find(']')?;
    Some(inner[..end].trim().trim_matches('"').to_string())
}

/// Whether `line` starts with `key` (bare or quoted) followed by `=`.
fn starts_with_key(line: &str, key: &str) -> bool {
    let quoted = format!("\"{key}\"");
    let rest = line
        .strip_prefix(quoted.as_str())
        .or_else(|| line.strip_prefix(key));
    rest.is_some_and(|r| r.trim_start().starts_with('='))
}

/// Turns a `toml` error into a diagnostic at the start of its span, with friendlier words.
fn toml_diagnostic(e: &toml::de::Error, text: &str, file: &Path) -> Diagnostic {
    let raw = e.message().trim();
    let mut msg = match raw.strip_prefix("unknown field ") {
        Some(rest) => format!("unknown key {rest}"),
        None => raw.replace("unknown variant", "unknown value"),
    };
    for (from, to) in [
        ("expected u64", "expected a non-negative integer"),
        ("expected u32", "expected a non-negative integer"),
        ("expected f64", "expected a number"),
    ] {
        msg = msg.replace(from, to);
    }
    let Some(span) = e.span() else {
        return Diagnostic::at_file(file, msg);
    };
    let is_value_error = [
        "invalid type",
        "invalid value",
        "invalid length",
        "unknown value",
    ]
    .iter()
    .any(|p| msg.starts_with(p));
    if is_value_error && let Some(key) = key_before(text, span.start) {
        msg = format!("`{key}`: {msg}");
    }
    Diagnostic::at_offset(file, text, span.start, msg)
}

/// The key of the nearest `key =` before byte `offset` (same line or a few lines up, not
/// crossing a table header): names the key whose value has the wrong type.
fn key_before(text: &str, offset: usize) -> Option<String> {
    let before = text.get(..offset)?;
    for line in before.rsplit('\n').take(20) {
        if header_name(line.trim_start()).is_some() {
            return None;
        }
        if let Some(eq) = line.rfind('=') {
            let head = line[..eq].trim_end();
            let start = head
                .char_indices()
                .rev()
                .find(|&(_, c)| !(c.is_ascii_alphanumeric() || "_-.\"".contains(c)))
                .map_or(0, |(i, c)| i + c.len_utf8());
            let key = head[start..].trim_matches('"');
            return (!key.is_empty()).then(|| key.to_string());
        }
    }
    None
}

fn read_error(path: &Path, what: &str, e: &io::Error) -> Diagnostic {
    let msg = if e.kind() == io::ErrorKind::NotFound {
        format!("{what} not found")
    } else {
        format!("cannot read {what}: {}", io_message(e))
    };
    Diagnostic::at_file(path, msg)
}

// ---------------------------------------------------------------------------------------------
// Users and groups
// ---------------------------------------------------------------------------------------------

/// Contents of `/etc/passwd` and `/etc/group`, used to resolve `user` / `group` names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdDb {
    /// `/etc/passwd` text.
    pub passwd: String,
    /// `/etc/group` text.
    pub group: String,
}

impl IdDb {
    /// Reads the system files; an unreadable file counts as empty (names then fail to resolve).
    pub fn system() -> Self {
        Self {
            passwd: fs::read_to_string("/etc/passwd").unwrap_or_default(),
            group: fs::read_to_string("/etc/group").unwrap_or_default(),
        }
    }
}

/// Fields of the non-comment lines of a colon-separated database.
fn db_rows(text: &str) -> impl Iterator<Item = Vec<&str>> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split(':').collect())
}

/// `(uid, primary gid)` of user `name` in `/etc/passwd` text.
pub fn lookup_user(passwd: &str, name: &str) -> Option<(u32, u32)> {
    db_rows(passwd)
        .find(|f| f.len() >= 4 && f[0] == name)
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
}

/// Primary gid of the user with id `uid` in `/etc/passwd` text.
pub fn lookup_primary_gid(passwd: &str, uid: u32) -> Option<u32> {
    db_rows(passwd)
        .filter(|f| f.len() >= 4)
        .find(|f| f[2].parse() == Ok(uid))
        .and_then(|f| f[3].parse().ok())
}

/// gid of group `name` in `/etc/group` text.
pub fn lookup_group(group: &str, name: &str) -> Option<u32> {
    db_rows(group)
        .find(|f| f.len() >= 3 && f[0] == name)
        .and_then(|f| f[2].parse().ok())
}

fn is_numeric(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Resolves `user` / `group` to numeric ids. With `user` but no `group`, the gid is the user's
/// primary group; for a numeric user without a passwd entry it is the uid itself.
fn resolve_ids(uf: &UnitFile, ids: &IdDb, c: &mut Checker) -> (Option<u32>, Option<u32>) {
    let mut uid = None;
    let mut primary = None;
    if let Some(user) = &uf.user {
        if is_numeric(user) {
            match user.parse::<u32>() {
                Ok(u) => {
                    uid = Some(u);
                    primary = Some(lookup_primary_gid(&ids.passwd, u).unwrap_or(u));
                }
                Err(_) => c.err("", "user", format!("`user`: id `{user}` is out of range")),
            }
        } else if let Some((u, g)) = lookup_user(&ids.passwd, user) {
            uid = Some(u);
            primary = Some(g);
        } else {
            c.err(
                "",
                "user",
                format!("`user`: unknown user `{user}` (not in /etc/passwd)"),
            );
        }
    }
    let gid = match &uf.group {
        None => primary,
        Some(group) if is_numeric(group) => match group.parse::<u32>() {
            Ok(g) => Some(g),
            Err(_) => {
                c.err(
                    "",
                    "group",
                    format!("`group`: id `{group}` is out of range"),
                );
                None
            }
        },
        Some(group) => {
            let g = lookup_group(&ids.group, group);
            if g.is_none() {
                c.err(
                    "",
                    "group",
                    format!("`group`: unknown group `{group}` (not in /etc/group)"),
                );
            }
            g
        }
    };
    (uid, gid)
}

// ---------------------------------------------------------------------------------------------
// Unit files
// ---------------------------------------------------------------------------------------------

/// Whether `name` is a valid unit name: `[A-Za-z0-9_.@-]+`, at most 64 characters.
pub fn valid_unit_name(name: &str) -> bool {
    // Names become path components (state and cgroup directories): never `.` or `..`, and
    // never hidden.
    !name.is_empty()
        && !name.starts_with('.')
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.@-".contains(&b))
}

/// Signal number of `SIGTERM`, `TERM` or `15` (any standard signal; case-insensitive names).
pub fn parse_signal(s: &str) -> Option<i32> {
    let s = s.trim();
    if is_numeric(s) {
        return Signal::try_from(s.parse::<i32>().ok()?)
            .ok()
            .map(|sig| sig as i32);
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    Signal::from_str(&name).ok().map(|sig| sig as i32)
}

/// Parses and validates unit `name` (the file stem) from `text`, resolving every default from
/// `cfg`; user and group names are looked up in the system files (see [`parse_unit_with_ids`]).
pub fn parse_unit(
    name: &str,
    text: &str,
    file: &Path,
    cfg: &Config,
) -> Result<Unit, Vec<Diagnostic>> {
    parse_unit_with_ids(name, text, file, cfg, &IdDb::system())
}

/// [`parse_unit`] with explicit `/etc/passwd` and `/etc/group` contents. Does not touch the
/// filesystem: whether `exec[0]` is executable is checked by [`load_units`].
pub fn parse_unit_with_ids(
    name: &str,
    text: &str,
    file: &Path,
    cfg: &Config,
    ids: &IdDb,
) -> Result<Unit, Vec<Diagnostic>> {
    let uf: UnitFile = toml::from_str(text).map_err(|e| vec![toml_diagnostic(&e, text, file)])?;
    let mut c = Checker::new(text, file);
    if !valid_unit_name(name) {
        c.diags.push(Diagnostic::at_file(
            file,
            format!(
                "invalid unit name `{name}`: use letters, digits, `_`, `.`, `@` and `-`, at most 64 characters"
            ),
        ));
    }
    match uf.exec.first() {
        None => c.err("", "exec", "`exec` must not be empty".into()),
        Some(prog) if !prog.starts_with('/') => c.err(
            "",
            "exec",
            format!("`exec[0]` must be an absolute path, found `{prog}`"),
        ),
        Some(_) => {}
    }
    if uf.exec.iter().any(|a| a.contains('\0')) {
        c.err("", "exec", "`exec` must not contain nul characters".into());
    }
    for (k, v) in &uf.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            c.err(
                "env",
                k,
                format!("`env`: invalid variable name or value `{k}`"),
            );
        }
    }
    if let Some(dir) = &uf.working_dir {
        c.absolute("", "working_dir", dir);
    }
    let (uid, gid) = resolve_ids(&uf, ids, &mut c);
    let stop_signal = match uf.stop_signal.as_deref() {
        None => libc::SIGTERM,
        Some(s) => parse_signal(s).unwrap_or_else(|| {
            c.err(
                "",
                "stop_signal",
                format!("`stop_signal`: unknown signal `{s}`"),
            );
            libc::SIGTERM
        }),
    };
    let cpu_limit_percent = uf
        .cpu_limit_percent
        .unwrap_or(cfg.process_management.cpu_limit_percent);
    if uf.cpu_limit_percent.is_some() {
        c.percent("", "cpu_limit_percent", cpu_limit_percent);
    }

    let rf = &uf.recovery;
    let cr = &cfg.crash_recovery;
    let recovery = Recovery {
        strategy: rf.strategy,
        delay_ms: rf.delay_ms.unwrap_or(DEFAULT_DELAY_MS),
        backoff_initial_ms: rf.backoff_initial_ms.unwrap_or(DEFAULT_BACKOFF_INITIAL_MS),
        backoff_max_ms: rf.backoff_max_ms.unwrap_or(DEFAULT_BACKOFF_MAX_MS),
        backoff_factor: rf.backoff_factor.unwrap_or(DEFAULT_BACKOFF_FACTOR),
        max_attempts: rf.max_attempts.unwrap_or(cr.max_recovery_attempts),
        reset_after_ms: rf
            .reset_after_ms
            .unwrap_or(cr.recovery_timeout_seconds.saturating_mul(1000)),
    };
    if !(recovery.backoff_factor.is_finite() && recovery.backoff_factor >= 1.0) {
        let msg = format!(
            "`recovery.backoff_factor` must be at least 1.0, found {}",
            recovery.backoff_factor
        );
        c.err("recovery", "backoff_factor", msg);
    }
    if recovery.backoff_initial_ms > recovery.backoff_max_ms {
        let msg = format!(
            "`recovery.backoff_initial_ms` ({}) must not exceed `recovery.backoff_max_ms` ({})",
            recovery.backoff_initial_ms, recovery.backoff_max_ms
        );
        let key = if rf.backoff_initial_ms.is_some() {
            "backoff_initial_ms"
        } else {
            "backoff_max_ms"
        };
        c.err("recovery", key, msg);
    }
    if recovery.max_attempts == 0 {
        c.err(
            "recovery",
            "max_attempts",
            "`recovery.max_attempts` must be at least 1".into(),
        );
    }

    let unit = Unit {
        name: name.to_string(),
        path: file.to_path_buf(),
        description: uf.description,
        exec: uf.exec,
        env: uf.env,
        working_dir: uf.working_dir,
        uid,
        gid,
        priority: uf.priority,
        critical: uf.critical || cr.critical_processes.iter().any(|p| p == name),
        after: uf.after,
        requires: uf.requires,
        safe_mode: uf.safe_mode || uf.safe_mode_only,
        safe_mode_only: uf.safe_mode_only,
        enabled: uf.enabled.unwrap_or(true),
        stop_signal,
        stop_timeout_ms: uf.stop_timeout_ms.unwrap_or(DEFAULT_STOP_TIMEOUT_MS),
        ready: uf.ready,
        ready_timeout_ms: uf.ready_timeout_ms.unwrap_or(DEFAULT_READY_TIMEOUT_MS),
        console: uf.console,
        memory_limit_mb: uf
            .memory_limit_mb
            .unwrap_or(cfg.process_management.memory_limit_mb),
        cpu_limit_percent,
        recovery,
    };
    c.finish(unit)
}

/// `Ok` when `path` exists, is a regular file (after symlinks) and has an execute bit.
pub fn check_executable(path: &Path) -> Result<(), String> {
    let meta = fs::metadata(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => format!("`{}` does not exist", path.display()),
        _ => format!("cannot access `{}`: {}", path.display(), io_message(&e)),
    })?;
    if !meta.is_file() {
        return Err(format!("`{}` is not a regular file", path.display()));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(format!("`{}` is not executable", path.display()));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Unit directory and dependency graph
// ---------------------------------------------------------------------------------------------

/// A unit that parsed, with its text (to locate graph diagnostics).
struct Entry {
    unit: Unit,
    text: String,
}

impl Entry {
    fn diag(&self, key: &str, message: String) -> Diagnostic {
        let (line, col) = locate_key(&self.text, "", key);
        Diagnostic::new(&self.unit.path, line, col, message)
    }

    /// Names in `after` and `requires`, with the key each came from.
    fn deps(&self) -> impl Iterator<Item = (&'static str, &str)> {
        let after = self.unit.after.iter().map(|d| ("after", d.as_str()));
        after.chain(self.unit.requires.iter().map(|d| ("requires", d.as_str())))
    }
}

/// Loads every `*.toml` unit in `dir` (sorted by file name; other files are ignored).
///
/// Returns the fully valid units, sorted by name, and every problem found. A unit is left out
/// when its file is invalid, its `exec[0]` is not executable, it names an unknown unit in
/// `after`/`requires`, it is part of a dependency cycle, or it `requires` a left-out unit.
pub fn load_units(dir: &Path, cfg: &Config) -> (Vec<Unit>, Vec<Diagnostic>) {
    let mut diags = Vec::new();
    let read = match fs::read_dir(dir) {
        Ok(read) => read,
        Err(e) => return (Vec::new(), vec![read_error(dir, "units directory", &e)]),
    };
    let mut files: Vec<PathBuf> = read
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();

    let ids = IdDb::system();
    let mut known = BTreeSet::new();
    let mut entries = Vec::new();
    for file in files {
        let Some(name) = file
            .file_stem()
            .and_then(|s| s.to_str())
            .map(str::to_string)
        else {
            diags.push(Diagnostic::at_file(
                &file,
                "unit file name is not valid utf-8",
            ));
            continue;
        };
        known.insert(name.clone());
        let text = match fs::read_to_string(&file) {
            Ok(text) => text,
            Err(e) => {
                diags.push(read_error(&file, "unit file", &e));
                continue;
            }
        };
        match parse_unit_with_ids(&name, &text, &file, cfg, &ids) {
            Err(mut d) => diags.append(&mut d),
            Ok(unit) => {
                let entry = Entry { unit, text };
                let prog = entry
                    .unit
                    .exec
                    .first()
                    .map(PathBuf::from)
                    .unwrap_or_default();
                match check_executable(&prog) {
                    Ok(()) => entries.push(entry),
                    Err(msg) => diags.push(entry.diag("exec", format!("`exec`: {msg}"))),
                }
            }
        }
    }
    let bad = check_graph(&entries, &known, &mut diags);
    let units = entries
        .into_iter()
        .zip(bad)
        .filter(|(_, bad)| !bad)
        .map(|(e, _)| e.unit)
        .collect();
    (units, diags)
}

/// Unknown dependencies, cycles, then `requires` on left-out units (to a fixed point).
/// `known` holds the name of every unit file, valid or not. Returns which entries are left out.
fn check_graph(
    entries: &[Entry],
    known: &BTreeSet<String>,
    diags: &mut Vec<Diagnostic>,
) -> Vec<bool> {
    let mut bad = vec![false; entries.len()];
    for (i, e) in entries.iter().enumerate() {
        for (key, dep) in e.deps().filter(|(_, d)| !known.contains(*d)) {
            diags.push(e.diag(key, format!("`{key}`: unknown unit `{dep}`")));
            bad[i] = true;
        }
    }

    let index: HashMap<&str, usize> = entries
        .iter()
        .enumerate()
        .map(|(i, e)| (e.unit.name.as_str(), i))
        .collect();
    let edges: Vec<Vec<usize>> = entries
        .iter()
        .map(|e| {
            let mut out: Vec<usize> = e
                .deps()
                .filter_map(|(_, d)| index.get(d).copied())
                .collect();
            out.sort_unstable();
            out.dedup();
            out
        })
        .collect();
    let mut in_cycle = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if let Some(cycle) = cycle_through(i, &edges) {
            let names: Vec<&str> = cycle
                .iter()
                .map(|&j| entries[j].unit.name.as_str())
                .collect();
            let next = names.get(1).copied().unwrap_or_default();
            let key = if e.unit.requires.iter().any(|r| r == next) {
                "requires"
            } else {
                "after"
            };
            diags.push(e.diag(key, format!("dependency cycle: {}", names.join(" -> "))));
            in_cycle.push(i);
        }
    }
    for i in in_cycle {
        bad[i] = true;
    }

    let mut changed = true;
    while changed {
        changed = false;
        for i in 0..entries.len() {
            if bad[i] {
                continue;
            }
            let broken = entries[i]
                .unit
                .requires
                .iter()
                .find(|r| match index.get(r.as_str()) {
                    Some(&j) => bad[j],
                    None => true, // a unit file that failed to parse (unknown names were caught above)
                });
            if let Some(dep) = broken {
                let msg = format!("`requires`: unit `{dep}` is invalid or was left out");
                diags.push(entries[i].diag("requires", msg));
                bad[i] = true;
                changed = true;
            }
        }
    }
    bad
}

/// Shortest dependency path from `start` back to itself (`[start, .., start]`), if any.
fn cycle_through(start: usize, edges: &[Vec<usize>]) -> Option<Vec<usize>> {
    let mut parent: Vec<Option<usize>> = vec![None; edges.len()];
    let mut queue = VecDeque::from([start]);
    while let Some(n) = queue.pop_front() {
        for &m in edges.get(n)? {
            if m == start {
                let mut back = Vec::new();
                let mut cur = n;
                while cur != start {
                    back.push(cur);
                    cur = parent[cur]?;
                }
                let mut path = vec![start];
                path.extend(back.into_iter().rev());
                path.push(start);
                return Some(path);
            }
            if parent[m].is_none() {
                parent[m] = Some(n);
                queue.push_back(m);
            }
        }
    }
    None
}

/// A deterministic start order (indices into `units`): every unit after the units it names in
/// `after`/`requires`; among ready units, higher priority (critical first), then name.
/// Names not in `units` are ignored; should a cycle remain, its units come last in the same order.
pub fn start_order(units: &[Unit]) -> Vec<usize> {
    let index: HashMap<&str, usize> = units
        .iter()
        .enumerate()
        .map(|(i, u)| (u.name.as_str(), i))
        .collect();
    let mut pending = vec![0usize; units.len()];
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); units.len()];
    for (i, u) in units.iter().enumerate() {
        let mut deps: Vec<usize> = u
            .after
            .iter()
            .chain(&u.requires)
            .filter_map(|d| index.get(d.as_str()).copied())
            .collect();
        deps.sort_unstable();
        deps.dedup();
        pending[i] = deps.len();
        for d in deps {
            dependents[d].push(i);
        }
    }
    let key =
        |i: usize| -> (Priority, &str, usize) { (units[i].priority, units[i].name.as_str(), i) };
    let mut ready: BTreeSet<_> = (0..units.len())
        .filter(|&i| pending[i] == 0)
        .map(key)
        .collect();
    let mut order = Vec::with_capacity(units.len());
    let mut placed = vec![false; units.len()];
    loop {
        while let Some((_, _, i)) = ready.pop_first() {
            order.push(i);
            placed[i] = true;
            for &d in &dependents[i] {
                pending[d] = pending[d].saturating_sub(1);
                if pending[d] == 0 && !placed[d] {
                    ready.insert(key(d));
                }
            }
        }
        // Only reached with leftovers when a cycle remains: release the best-ranked one.
        match (0..units.len()).filter(|&i| !placed[i]).map(key).min() {
            Some(k) => {
                pending[k.2] = 0;
                ready.insert(k);
            }
            None => break,
        }
    }
    order
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::config::model::{
        CrashRecovery, HealthChecking, ProcessManagement, Ready, ResourceMonitoring, Strategy,
        System,
    };

    const DESIGN: &str = include_str!("../../tests/fixtures/config/design.toml");
    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n# comment\n\ntau:x:1000:1001:Tau:/home/tau:/bin/sh\nnobody:x:65534:65534::/:/bin/false\nbroken:x:zz:1\n";
    const GROUP: &str = "root:x:0:\nvideo:x:44:tau\ntau:x:1001:\n";

    fn file() -> &'static Path {
        Path::new("/etc/tau/tau.toml")
    }

    fn cfg_err(text: &str) -> Vec<Diagnostic> {
        match parse_config(text, file()) {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(d) => d,
        }
    }

    fn one_err(text: &str) -> Diagnostic {
        let d = cfg_err(text);
        assert_eq!(d.len(), 1, "{d:?}");
        d[0].clone()
    }

    fn ids() -> IdDb {
        IdDb {
            passwd: PASSWD.into(),
            group: GROUP.into(),
        }
    }

    fn unit(name: &str, text: &str) -> Result<Unit, Vec<Diagnostic>> {
        unit_cfg(name, text, &Config::default())
    }

    fn unit_cfg(name: &str, text: &str, cfg: &Config) -> Result<Unit, Vec<Diagnostic>> {
        parse_unit_with_ids(name, text, Path::new("/etc/tau/units/x.toml"), cfg, &ids())
    }

    fn unit_err(text: &str) -> Diagnostic {
        match unit("x", text) {
            Ok(u) => panic!("expected an error, got {u:?}"),
            Err(d) => {
                assert_eq!(d.len(), 1, "{d:?}");
                d[0].clone()
            }
        }
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    // ----- tau.toml -------------------------------------------------------------------------

    #[test]
    fn design_blocks_parse_exactly() {
        let cfg = parse_config(DESIGN, file()).unwrap();
        let expected = Config {
            system: System::default(),
            resource_monitoring: ResourceMonitoring {
                enabled: true,
                interval_seconds: 30,
                cpu_threshold_percent: 80.0,
                memory_threshold_percent: 85.0,
                disk_threshold_percent: 90.0,
                network_monitoring: true,
                temperature_monitoring: true,
                alert_on_threshold: true,
                log_resource_usage: true,
            },
            process_management: ProcessManagement {
                enabled: true,
                max_concurrent_processes: 100,
                process_priority_levels: 5,
                memory_limit_mb: 2048,
                cpu_limit_percent: 50.0,
                auto_cleanup_zombies: true,
                process_isolation: true,
                resource_pooling: true,
            },
            crash_recovery: CrashRecovery {
                enabled: true,
                auto_recovery: true,
                max_recovery_attempts: 3,
                recovery_timeout_seconds: 60,
                save_session_state: true,
                session_state_path: PathBuf::from("/var/lib/tau/session_state"),
                critical_processes: strings(&[
                    "tau-session",
                    "tau-powerd",
                    "tau-inputd",
                    "tau-displaysvc",
                ]),
            },
            health_checking: HealthChecking {
                enabled: true,
                check_interval_seconds: 60,
                system_health_checks: strings(&[
                    "cpu_usage",
                    "memory_usage",
                    "disk_usage",
                    "network_connectivity",
                ]),
                service_health_checks: strings(&[
                    "tau-session",
                    "tau-powerd",
                    "tau-inputd",
                    "tau-displaysvc",
                ]),
                alert_on_failure: true,
                auto_restart_failed_services: true,
                health_score_threshold: 0.7,
            },
        };
        assert_eq!(cfg, expected);
    }

    #[test]
    fn design_values_differ_from_defaults_only_in_lists() {
        // Guards the test above against comparing defaults with defaults.
        let cfg = parse_config(DESIGN, file()).unwrap();
        assert_ne!(cfg, Config::default());
        let mut d = Config::default();
        d.crash_recovery.critical_processes = cfg.crash_recovery.critical_processes.clone();
        d.health_checking.system_health_checks = cfg.health_checking.system_health_checks.clone();
        d.health_checking.service_health_checks = cfg.health_checking.service_health_checks.clone();
        assert_eq!(cfg, d);
    }

    #[test]
    fn empty_config_is_default() {
        let cfg = parse_config("", file()).unwrap();
        assert_eq!(cfg, Config::default());
        assert_eq!(cfg.system.units_dir, PathBuf::from("/etc/tau/units"));
        assert_eq!(cfg.system.log_level, "info");
        assert_eq!(cfg.system.shutdown_kill_timeout_ms, 3000);
        assert_eq!(cfg.resource_monitoring.interval_seconds, 30);
        assert_eq!(cfg.process_management.process_priority_levels, 5);
        assert_eq!(cfg.crash_recovery.max_recovery_attempts, 3);
        assert_eq!(cfg.health_checking.health_score_threshold, 0.7);
    }

    #[test]
    fn system_section_parses() {
        let text = r#"
[system]
units_dir = "/etc/tau/u"
run_dir = "/run/t"
state_dir = "/var/lib/t"
modules = ["virtio_blk.ko", "/lib/ext4.ko"]
module_dir = "/lib/modules/6.1"
persistent_device = "/dev/sda"
persistent_fstype = "xfs"
persistent_mount = "/data"
hostname = "box"
log_level = "debug"
control_group = "wheel"
shutdown_kill_timeout_ms = 1500
cgroup_root = "/cgroup2"
audit_log = "/data/audit.log"
"#;
        let s = parse_config(text, file()).unwrap().system;
        let expected = System {
            units_dir: "/etc/tau/u".into(),
            run_dir: "/run/t".into(),
            state_dir: "/var/lib/t".into(),
            modules: strings(&["virtio_blk.ko", "/lib/ext4.ko"]),
            module_dir: "/lib/modules/6.1".into(),
            persistent_device: "/dev/sda".into(),
            persistent_fstype: "xfs".into(),
            persistent_mount: "/data".into(),
            hostname: "box".into(),
            log_level: "debug".into(),
            control_group: "wheel".into(),
            shutdown_kill_timeout_ms: 1500,
            cgroup_root: "/cgroup2".into(),
            audit_log: "/data/audit.log".into(),
        };
        assert_eq!(s, expected);
    }

    #[test]
    fn unknown_key_in_each_section_is_located() {
        for section in [
            "system",
            "resource_monitoring",
            "process_management",
            "crash_recovery",
            "health_checking",
        ] {
            let text = format!("# tau\n[{section}]\n\n  bogus_key = true\n");
            let d = one_err(&text);
            assert_eq!((d.line, d.col), (4, 3), "{section}: {d}");
            assert!(
                d.message
                    .starts_with("unknown key `bogus_key`, expected one of"),
                "{d}"
            );
            assert_eq!(d.file, file());
        }
        let d = one_err(&DESIGN.replace(
            "alert_on_failure = true",
            "alert_on_failure = true\n    alert_on_falure = true",
        ));
        assert_eq!((d.line, d.col), (37, 5), "{d}");
        assert!(
            d.to_string()
                .starts_with("/etc/tau/tau.toml:37:5: unknown key `alert_on_falure`"),
            "{d}"
        );
    }

    #[test]
    fn unknown_section_and_top_level_key() {
        let d = one_err("[system]\nhostname = \"a\"\n\n[sytem]\n");
        assert_eq!((d.line, d.col), (4, 2));
        assert!(d.message.starts_with("unknown key `sytem`"), "{d}");
        let d = one_err("log_level = \"info\"\n");
        assert_eq!((d.line, d.col), (1, 1));
        assert!(d.message.starts_with("unknown key `log_level`"), "{d}");
    }

    #[test]
    fn type_errors_name_key_and_line() {
        let d = one_err("[resource_monitoring]\nenabled = true\ninterval_seconds = \"30\"\n");
        assert_eq!((d.line, d.col), (3, 20));
        assert_eq!(
            d.message,
            "`interval_seconds`: invalid type: string \"30\", expected a non-negative integer"
        );
        let d = one_err("[process_management]\nmemory_limit_mb = -1\n");
        assert_eq!((d.line, d.col), (2, 19));
        assert!(
            d.message.starts_with("`memory_limit_mb`: invalid value"),
            "{d}"
        );
        let d = one_err("[crash_recovery]\ncritical_processes = [\n  \"a\",\n  3,\n]\n");
        assert_eq!((d.line, d.col), (4, 3));
        assert!(
            d.message
                .starts_with("`critical_processes`: invalid type: integer `3`"),
            "{d}"
        );
        let d = one_err("[health_checking]\nenabled = \"yes\"\n");
        assert_eq!((d.line, d.col), (2, 11));
        assert!(d.message.starts_with("`enabled`: invalid type"), "{d}");
    }

    #[test]
    fn syntax_errors_are_located() {
        let d = one_err("[system]\nhostname = \"a\"\nhostname = \"b\"\n");
        assert_eq!(d.line, 3);
        assert!(d.message.contains("duplicate key"), "{d}");
        let d = one_err("\n[resource_monitoring\n");
        assert_eq!(d.line, 2);
    }

    #[test]
    fn semantic_checks_point_at_key() {
        let cases: &[(&str, &str, &str, &str)] = &[
            (
                "process_management",
                "process_priority_levels",
                "4",
                "must be 5, found 4",
            ),
            (
                "process_management",
                "max_concurrent_processes",
                "0",
                "must be greater than 0",
            ),
            (
                "process_management",
                "cpu_limit_percent",
                "100.5",
                "between 0 and 100",
            ),
            (
                "resource_monitoring",
                "cpu_threshold_percent",
                "101",
                "between 0 and 100",
            ),
            (
                "resource_monitoring",
                "memory_threshold_percent",
                "-1.0",
                "between 0 and 100",
            ),
            (
                "resource_monitoring",
                "disk_threshold_percent",
                "nan",
                "between 0 and 100",
            ),
            (
                "resource_monitoring",
                "interval_seconds",
                "0",
                "must be greater than 0",
            ),
            (
                "health_checking",
                "check_interval_seconds",
                "0",
                "must be greater than 0",
            ),
            (
                "health_checking",
                "health_score_threshold",
                "1.5",
                "between 0.0 and 1.0",
            ),
            (
                "health_checking",
                "health_score_threshold",
                "-0.1",
                "between 0.0 and 1.0",
            ),
            (
                "crash_recovery",
                "max_recovery_attempts",
                "0",
                "must be greater than 0",
            ),
            (
                "crash_recovery",
                "session_state_path",
                "\"var/state\"",
                "absolute path, found `var/state`",
            ),
            (
                "crash_recovery",
                "critical_processes",
                "[\"ok\", \"bad name\"]",
                "invalid unit name `bad name`",
            ),
            ("system", "log_level", "\"verbose\"", "found `verbose`"),
            ("system", "units_dir", "\"units\"", "absolute path"),
            ("system", "run_dir", "\"run\"", "absolute path"),
            ("system", "state_dir", "\"\"", "absolute path"),
            ("system", "module_dir", "\"lib\"", "absolute path"),
            ("system", "persistent_mount", "\"var\"", "absolute path"),
            ("system", "modules", "[\"\"]", "empty entries"),
            (
                "system",
                "cgroup_root",
                "\"sys/fs/cgroup\"",
                "absolute path",
            ),
        ];
        for (section, key, value, expect) in cases {
            let text = format!(
                "[system]\nhostname = \"h\"\n\n[{section}]\nenabled = true\n {key} = {value}\n"
            )
            .replace(
                "[system]\nhostname = \"h\"\n\n[system]\nenabled = true\n",
                "[system]\nhostname = \"h\"\n\n\n\n",
            );
            let d = one_err(&text);
            assert_eq!((d.line, d.col), (6, 2), "{key}: {d}");
            assert!(d.message.contains(&format!("`{section}.{key}`")), "{d}");
            assert!(d.message.contains(expect), "{d}");
        }
        assert_eq!(
            one_err("[process_management]\nprocess_priority_levels = 3\n").to_string(),
            "/etc/tau/tau.toml:2:1: `process_management.process_priority_levels` must be 5, found 3"
        );
    }

    #[test]
    fn semantic_boundaries_accepted() {
        let text = "[resource_monitoring]\ncpu_threshold_percent = 0\ndisk_threshold_percent = 100\ninterval_seconds = 1\n\
                    [health_checking]\nhealth_score_threshold = 1\ncheck_interval_seconds = 1\n\
                    [crash_recovery]\nmax_recovery_attempts = 1\n[system]\nlog_level = \"error\"\n";
        let cfg = parse_config(text, file()).unwrap();
        assert_eq!(cfg.health_checking.health_score_threshold, 1.0);
        assert_eq!(cfg.resource_monitoring.disk_threshold_percent, 100.0);
        for level in LOG_LEVELS {
            assert!(parse_config(&format!("[system]\nlog_level = \"{level}\"\n"), file()).is_ok());
        }
    }

    #[test]
    fn all_semantic_errors_reported() {
        let d = cfg_err(
            "[process_management]\nprocess_priority_levels = 3\n[health_checking]\nhealth_score_threshold = 2.0\n",
        );
        assert_eq!(d.iter().map(|d| d.line).collect::<Vec<_>>(), vec![2, 4]);
    }

    #[test]
    fn semantic_error_without_key_points_at_default() {
        // Default values are valid, so an error always comes from a written key; an inline
        // table still locates the table.
        let d = one_err("process_management = { process_priority_levels = 7 }\n");
        assert_eq!((d.line, d.col), (1, 1));
        let d = one_err("\n\nprocess_management.process_priority_levels = 7\n");
        assert_eq!((d.line, d.col), (3, 1));
    }

    #[test]
    fn locate_key_fallbacks() {
        let text = "a = 1\n[s]\nx = 1\n  \"y\" = 2\n[t]\nx = 3\n";
        assert_eq!(locate_key(text, "", "a"), (1, 1));
        assert_eq!(locate_key(text, "s", "x"), (3, 1));
        assert_eq!(locate_key(text, "s", "y"), (4, 3));
        assert_eq!(locate_key(text, "t", "x"), (6, 1));
        assert_eq!(locate_key(text, "t", "missing"), (5, 1));
        assert_eq!(locate_key(text, "u", "x"), (1, 1));
        assert_eq!(locate_key(text, "", "x"), (1, 1));
        assert_eq!(locate_key("xy = 1\nx = 2\n", "", "x"), (2, 1));
    }

    #[test]
    fn key_before_finds_key() {
        assert_eq!(key_before("a = 1\nkey = 5", 12).as_deref(), Some("key"));
        assert_eq!(key_before("r = { s = \"x\" }", 10).as_deref(), Some("s"));
        assert_eq!(key_before("[t]\n  3", 6), None);
        assert_eq!(key_before("x", 99), None);
        assert_eq!(key_before("é = 1", 4), None);
        assert_eq!(key_before("aé b = 1", 8).as_deref(), Some("b"));
    }

    /// Nothing in here may panic on any input: PID 1 must survive a broken file.
    #[test]
    fn no_panic_on_truncated_or_odd_input() {
        let unit_text = "description = \"é\"\nexec = [\"/x\", \"é\"]\nenv = { A = \"1\" }\nuser = \"tau\"\n\
                         stop_signal = \"TERM\"\n[recovery]\nstrategy = \"restart_with_backoff\"\nbackoff_factor = 1.5\n";
        for text in [DESIGN, unit_text] {
            for end in (0..=text.len()).filter(|&i| text.is_char_boundary(i)) {
                let _ = parse_config(&text[..end], file());
                let _ = unit("x", &text[..end]);
            }
        }
        for odd in [
            "\u{0}",
            "[",
            "]]",
            "= =",
            "é = \"\"",
            "[system]\nlog_level = \"é\"\n",
            "a.b.c = 1",
            "\"\" = 1",
        ] {
            let _ = parse_config(odd, file());
            let _ = unit("é", odd);
        }
    }

    fn temp_dir(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("tau-config-{}-{tag}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    struct TempDir(PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn write(path: &Path, text: &str, mode: u32) {
        fs::write(path, text).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn load_config_files() {
        let dir = temp_dir("cfg");
        let missing = dir.0.join("missing.toml");
        let d = load_config(&missing).unwrap_err();
        assert_eq!(
            d,
            vec![Diagnostic::new(&missing, 1, 1, "config file not found")]
        );
        assert_eq!(load_config_or_default(&missing, true).unwrap_err().len(), 1);
        assert_eq!(
            load_config_or_default(&missing, false).unwrap(),
            Config::default()
        );

        let path = dir.0.join("tau.toml");
        write(&path, DESIGN, 0o644);
        assert_eq!(
            load_config(&path).unwrap(),
            parse_config(DESIGN, &path).unwrap()
        );
        write(&path, "[system]\nbogus = 1\n", 0o644);
        let d = load_config_or_default(&path, false).unwrap_err();
        assert_eq!(
            d[0].to_string(),
            format!("{}:2:1: {}", path.display(), d[0].message)
        );
        // A directory is not a config file, even when it may be missing.
        assert!(
            load_config_or_default(&dir.0, false).unwrap_err()[0]
                .message
                .starts_with("cannot read config file")
        );
    }

    // ----- unit files -----------------------------------------------------------------------

    #[test]
    fn unit_defaults() {
        let u = unit("svc", "exec = [\"/usr/bin/svc\"]\n").unwrap();
        let expected = Unit {
            name: "svc".into(),
            path: PathBuf::from("/etc/tau/units/x.toml"),
            description: String::new(),
            exec: strings(&["/usr/bin/svc"]),
            env: BTreeMap::new(),
            working_dir: None,
            uid: None,
            gid: None,
            priority: Priority::Normal,
            critical: false,
            after: vec![],
            requires: vec![],
            safe_mode: false,
            safe_mode_only: false,
            enabled: true,
            stop_signal: 15,
            stop_timeout_ms: 5000,
            ready: Ready::None,
            ready_timeout_ms: 30_000,
            console: false,
            memory_limit_mb: 2048,
            cpu_limit_percent: 50.0,
            recovery: Recovery {
                strategy: Strategy::Restart,
                delay_ms: 1000,
                backoff_initial_ms: 500,
                backoff_max_ms: 30_000,
                backoff_factor: 2.0,
                max_attempts: 3,
                reset_after_ms: 60_000,
            },
        };
        assert_eq!(u, expected);
    }

    #[test]
    fn unit_defaults_follow_config() {
        let mut cfg = parse_config(DESIGN, file()).unwrap();
        cfg.crash_recovery.max_recovery_attempts = 7;
        cfg.crash_recovery.recovery_timeout_seconds = 120;
        cfg.process_management.memory_limit_mb = 512;
        cfg.process_management.cpu_limit_percent = 25.0;
        let u = unit_cfg("tau-powerd", "exec = [\"/sbin/tau-powerd\"]\n", &cfg).unwrap();
        assert!(u.critical, "named in critical_processes");
        assert_eq!(u.recovery.max_attempts, 7);
        assert_eq!(u.recovery.reset_after_ms, 120_000);
        assert_eq!(u.memory_limit_mb, 512);
        assert_eq!(u.cpu_limit_percent, 25.0);
        let u = unit_cfg("other", "exec = [\"/sbin/other\"]\n", &cfg).unwrap();
        assert!(!u.critical);
        let u = unit_cfg("other", "exec = [\"/sbin/other\"]\ncritical = true\n", &cfg).unwrap();
        assert!(u.critical);
    }

    #[test]
    fn every_unit_key() {
        let text = r#"
description = "display service"
exec = ["/usr/bin/tau-displaysvc", "--drm", "card0"]
env = { WAYLAND_DISPLAY = "wayland-0", LANG = "C.UTF-8" }
working_dir = "/var/lib/display"
user = "tau"
group = "video"
priority = "high"
critical = true
after = ["tau-powerd"]
requires = ["tau-inputd", "tau-powerd"]
safe_mode = false
safe_mode_only = true
enabled = false
stop_signal = "SIGINT"
stop_timeout_ms = 2500
ready = "notify"
ready_timeout_ms = 10000
console = true
memory_limit_mb = 0
cpu_limit_percent = 100.0

[recovery]
strategy = "restart_with_backoff"
delay_ms = 250
backoff_initial_ms = 100
backoff_max_ms = 8000
backoff_factor = 1.5
max_attempts = 9
reset_after_ms = 90000
"#;
        let u = unit("tau-displaysvc", text).unwrap();
        let expected = Unit {
            name: "tau-displaysvc".into(),
            path: PathBuf::from("/etc/tau/units/x.toml"),
            description: "display service".into(),
            exec: strings(&["/usr/bin/tau-displaysvc", "--drm", "card0"]),
            env: BTreeMap::from([
                ("LANG".to_string(), "C.UTF-8".to_string()),
                ("WAYLAND_DISPLAY".to_string(), "wayland-0".to_string()),
            ]),
            working_dir: Some(PathBuf::from("/var/lib/display")),
            uid: Some(1000),
            gid: Some(44),
            priority: Priority::High,
            critical: true,
            after: strings(&["tau-powerd"]),
            requires: strings(&["tau-inputd", "tau-powerd"]),
            safe_mode: true,
            safe_mode_only: true,
            enabled: false,
            stop_signal: libc::SIGINT,
            stop_timeout_ms: 2500,
            ready: Ready::Notify,
            ready_timeout_ms: 10_000,
            console: true,
            memory_limit_mb: 0,
            cpu_limit_percent: 100.0,
            recovery: Recovery {
                strategy: Strategy::RestartWithBackoff,
                delay_ms: 250,
                backoff_initial_ms: 100,
                backoff_max_ms: 8000,
                backoff_factor: 1.5,
                max_attempts: 9,
                reset_after_ms: 90_000,
            },
        };
        assert_eq!(u, expected);
    }

    #[test]
    fn strategies_and_priorities_spelled_as_designed() {
        for (s, want) in [
            ("restart", Strategy::Restart),
            ("restart_with_delay", Strategy::RestartWithDelay),
            ("restart_with_backoff", Strategy::RestartWithBackoff),
            ("fallback_to_safe_mode", Strategy::FallbackToSafeMode),
            ("notify_admin", Strategy::NotifyAdmin),
        ] {
            let u = unit(
                "x",
                &format!("exec = [\"/x\"]\n[recovery]\nstrategy = \"{s}\"\n"),
            )
            .unwrap();
            assert_eq!(u.recovery.strategy, want);
        }
        for p in Priority::ALL {
            let u = unit(
                "x",
                &format!("exec = [\"/x\"]\npriority = \"{}\"\n", p.as_str()),
            )
            .unwrap();
            assert_eq!(u.priority, p);
        }
        let d = unit_err("exec = [\"/x\"]\n[recovery]\nstrategy = \"retry\"\n");
        assert_eq!((d.line, d.col), (3, 12));
        assert!(
            d.message.starts_with("`strategy`: unknown value `retry`"),
            "{d}"
        );
    }

    #[test]
    fn stop_signal_spellings() {
        for (s, n) in [
            ("SIGTERM", libc::SIGTERM),
            ("TERM", libc::SIGTERM),
            ("15", libc::SIGTERM),
            ("sigterm", libc::SIGTERM),
            ("term", libc::SIGTERM),
            ("SIGKILL", libc::SIGKILL),
            ("9", libc::SIGKILL),
            ("HUP", libc::SIGHUP),
            ("SIGUSR1", libc::SIGUSR1),
            ("USR2", libc::SIGUSR2),
            ("SIGQUIT", libc::SIGQUIT),
        ] {
            assert_eq!(parse_signal(s), Some(n), "{s}");
            let u = unit("x", &format!("exec = [\"/x\"]\nstop_signal = \"{s}\"\n")).unwrap();
            assert_eq!(u.stop_signal, n, "{s}");
        }
        for bad in ["", "0", "99", "-15", "SIGFOO", "SIG", "15x", "99999999999"] {
            assert_eq!(parse_signal(bad), None, "{bad}");
        }
        let d = unit_err("exec = [\"/x\"]\n\nstop_signal = \"SIGFOO\"\n");
        assert_eq!(
            d.to_string(),
            "/etc/tau/units/x.toml:3:1: `stop_signal`: unknown signal `SIGFOO`"
        );
        let d = unit_err("exec = [\"/x\"]\nstop_signal = 15\n");
        assert_eq!(d.line, 2);
        assert!(d.message.starts_with("`stop_signal`: invalid type"), "{d}");
    }

    #[test]
    fn safe_mode_only_implies_safe_mode() {
        let u = unit("x", "exec = [\"/x\"]\nsafe_mode_only = true\n").unwrap();
        assert!(u.safe_mode && u.safe_mode_only);
        let u = unit("x", "exec = [\"/x\"]\nsafe_mode = true\n").unwrap();
        assert!(u.safe_mode && !u.safe_mode_only);
    }

    #[test]
    fn unit_unknown_keys_located() {
        let d = unit_err("exec = [\"/x\"]\nrestart = \"always\"\n");
        assert_eq!((d.line, d.col), (2, 1));
        assert!(d.message.starts_with("unknown key `restart`"), "{d}");
        let d = unit_err("exec = [\"/x\"]\n\n[recovery]\nstrategy = \"restart\"\n  delay = 5\n");
        assert_eq!((d.line, d.col), (5, 3));
        assert!(d.message.starts_with("unknown key `delay`"), "{d}");
        let d = unit_err("exec = [\"/x\"]\nrecovery = { strategy = \"restart\", dely_ms = 1 }\n");
        assert_eq!((d.line, d.col), (2, 36));
        assert!(d.message.starts_with("unknown key `dely_ms`"), "{d}");
    }

    #[test]
    fn unit_checks() {
        let cases: &[(&str, (usize, usize), &str)] = &[
            ("exec = []\n", (1, 1), "`exec` must not be empty"),
            ("description = \"d\"\n", (1, 1), "`exec` must not be empty"),
            (
                "\nexec = [\"sh\", \"-c\"]\n",
                (2, 1),
                "`exec[0]` must be an absolute path, found `sh`",
            ),
            (
                "exec = [\"/x\", \"a\\u0000b\"]\n",
                (1, 1),
                "`exec` must not contain nul characters",
            ),
            (
                "exec = [\"/x\"]\n[env]\n\"A=B\" = \"1\"\n",
                (3, 1),
                "`env`: invalid variable name or value `A=B`",
            ),
            (
                "exec = [\"/x\"]\nenv = { \"\" = \"1\" }\n",
                (2, 1),
                "`env`: invalid variable name or value ``",
            ),
            (
                "exec = [\"/x\"]\nworking_dir = \"tmp\"\n",
                (2, 1),
                "`working_dir` must be an absolute path, found `tmp`",
            ),
            (
                "exec = [\"/x\"]\ncpu_limit_percent = 150.0\n",
                (2, 1),
                "`cpu_limit_percent` must be between 0 and 100, found 150",
            ),
            (
                "exec = [\"/x\"]\n[recovery]\nbackoff_factor = 0.5\n",
                (3, 1),
                "`recovery.backoff_factor` must be at least 1.0, found 0.5",
            ),
            (
                "exec = [\"/x\"]\n[recovery]\nbackoff_factor = nan\n",
                (3, 1),
                "`recovery.backoff_factor` must be at least 1.0, found NaN",
            ),
            (
                "exec = [\"/x\"]\n[recovery]\nmax_attempts = 0\n",
                (3, 1),
                "`recovery.max_attempts` must be at least 1",
            ),
            (
                "exec = [\"/x\"]\n[recovery]\nbackoff_initial_ms = 5000\nbackoff_max_ms = 100\n",
                (3, 1),
                "`recovery.backoff_initial_ms` (5000) must not exceed `recovery.backoff_max_ms` (100)",
            ),
            (
                "exec = [\"/x\"]\n[recovery]\nbackoff_max_ms = 100\n",
                (3, 1),
                "`recovery.backoff_initial_ms` (500) must not exceed `recovery.backoff_max_ms` (100)",
            ),
            (
                "exec = [\"/x\"]\nuser = \"ghost\"\n",
                (2, 1),
                "`user`: unknown user `ghost` (not in /etc/passwd)",
            ),
            (
                "exec = [\"/x\"]\ngroup = \"ghosts\"\n",
                (2, 1),
                "`group`: unknown group `ghosts` (not in /etc/group)",
            ),
            (
                "exec = [\"/x\"]\nuser = \"99999999999\"\n",
                (2, 1),
                "`user`: id `99999999999` is out of range",
            ),
        ];
        for (text, (line, col), msg) in cases {
            let d = unit_err(text);
            assert_eq!(
                (d.line, d.col, d.message.as_str()),
                (*line, *col, *msg),
                "{text}"
            );
        }
        // Boundaries that are fine.
        let u = unit("x", "exec = [\"/x\"]\n[recovery]\nbackoff_factor = 1.0\nbackoff_initial_ms = 7\nbackoff_max_ms = 7\nmax_attempts = 1\n").unwrap();
        assert_eq!(
            (
                u.recovery.backoff_factor,
                u.recovery.backoff_initial_ms,
                u.recovery.max_attempts
            ),
            (1.0, 7, 1)
        );
    }

    #[test]
    fn unit_reports_every_problem() {
        let d = unit(
            "bad name",
            "exec = [\"rel\"]\nstop_signal = \"NOPE\"\n[recovery]\nmax_attempts = 0\n",
        )
        .unwrap_err();
        let got: Vec<(usize, usize)> = d.iter().map(|d| (d.line, d.col)).collect();
        assert_eq!(got, vec![(1, 1), (1, 1), (2, 1), (4, 1)], "{d:?}");
        assert!(
            d[0].message.starts_with("invalid unit name `bad name`"),
            "{}",
            d[0]
        );
    }

    #[test]
    fn unit_names() {
        for ok in [
            "a",
            "tau-session",
            "getty@tty1",
            "x_y.z",
            "A9",
            &"n".repeat(64),
        ] {
            assert!(valid_unit_name(ok), "{ok}");
        }
        for bad in [
            "",
            "a b",
            "a/b",
            "é",
            "a:b",
            ".",
            "..",
            ".hidden",
            &"n".repeat(65),
        ] {
            assert!(!valid_unit_name(bad), "{bad}");
            assert!(unit(bad, "exec = [\"/x\"]\n").is_err(), "{bad}");
        }
    }

    #[test]
    fn user_and_group_lookup() {
        assert_eq!(lookup_user(PASSWD, "root"), Some((0, 0)));
        assert_eq!(lookup_user(PASSWD, "tau"), Some((1000, 1001)));
        assert_eq!(lookup_user(PASSWD, "nobody"), Some((65534, 65534)));
        assert_eq!(lookup_user(PASSWD, "broken"), None);
        assert_eq!(lookup_user(PASSWD, "ta"), None);
        assert_eq!(lookup_user(PASSWD, "# comment"), None);
        assert_eq!(lookup_user("", "root"), None);
        assert_eq!(lookup_primary_gid(PASSWD, 1000), Some(1001));
        assert_eq!(lookup_primary_gid(PASSWD, 4242), None);
        assert_eq!(lookup_group(GROUP, "video"), Some(44));
        assert_eq!(lookup_group(GROUP, "tau"), Some(1001));
        assert_eq!(lookup_group(GROUP, "audio"), None);
    }

    #[test]
    fn user_and_group_resolution() {
        let ids = |text: &str| {
            let u = unit("x", &format!("exec = [\"/x\"]\n{text}")).unwrap();
            (u.uid, u.gid)
        };
        assert_eq!(ids(""), (None, None));
        assert_eq!(ids("user = \"tau\"\n"), (Some(1000), Some(1001)));
        assert_eq!(
            ids("user = \"tau\"\ngroup = \"video\"\n"),
            (Some(1000), Some(44))
        );
        assert_eq!(
            ids("user = \"tau\"\ngroup = \"7\"\n"),
            (Some(1000), Some(7))
        );
        assert_eq!(ids("user = \"1000\"\n"), (Some(1000), Some(1001)));
        assert_eq!(ids("user = \"4242\"\n"), (Some(4242), Some(4242)));
        assert_eq!(ids("group = \"video\"\n"), (None, Some(44)));
        assert_eq!(ids("user = \"0\"\n"), (Some(0), Some(0)));
    }

    #[test]
    fn executable_check() {
        let dir = temp_dir("exe");
        let exe = dir.0.join("exe");
        let plain = dir.0.join("plain");
        write(&exe, "#!/bin/sh\n", 0o755);
        write(&plain, "data", 0o644);
        assert_eq!(check_executable(&exe), Ok(()));
        let only_user = dir.0.join("u");
        write(&only_user, "", 0o100);
        assert_eq!(check_executable(&only_user), Ok(()));
        assert_eq!(
            check_executable(&plain),
            Err(format!("`{}` is not executable", plain.display()))
        );
        assert_eq!(
            check_executable(&dir.0),
            Err(format!("`{}` is not a regular file", dir.0.display()))
        );
        let missing = dir.0.join("missing");
        assert_eq!(
            check_executable(&missing),
            Err(format!("`{}` does not exist", missing.display()))
        );
    }

    // ----- unit directories -----------------------------------------------------------------

    /// A temp unit dir with an executable at `<dir>/bin`; `units` are (name, extra toml).
    fn unit_dir(tag: &str, units: &[(&str, &str)]) -> (TempDir, PathBuf) {
        let dir = temp_dir(tag);
        let exe = dir.0.join("bin");
        write(&exe, "#!/bin/sh\n", 0o755);
        for (name, extra) in units {
            let text = format!("exec = [\"{}\"]\n{extra}", exe.display());
            write(&dir.0.join(format!("{name}.toml")), &text, 0o644);
        }
        (dir, exe)
    }

    fn names(units: &[Unit]) -> Vec<&str> {
        units.iter().map(|u| u.name.as_str()).collect()
    }

    #[test]
    fn loads_sorted_units_and_ignores_other_files() {
        let (dir, _) = unit_dir(
            "ok",
            &[
                ("b", "after = [\"a\"]\n"),
                ("a", ""),
                ("c", "requires = [\"a\", \"b\"]\n"),
            ],
        );
        write(&dir.0.join("README"), "not a unit", 0o644);
        write(&dir.0.join("d.toml.bak"), "garbage", 0o644);
        let (units, diags) = load_units(&dir.0, &Config::default());
        assert!(diags.is_empty(), "{diags:?}");
        assert_eq!(names(&units), vec!["a", "b", "c"]);
        assert_eq!(units[2].path, dir.0.join("c.toml"));
    }

    #[test]
    fn missing_units_dir() {
        let dir = temp_dir("nodir");
        let missing = dir.0.join("units");
        let (units, diags) = load_units(&missing, &Config::default());
        assert!(units.is_empty());
        assert_eq!(
            diags,
            vec![Diagnostic::at_file(&missing, "units directory not found")]
        );
    }

    #[test]
    fn parse_errors_leave_unit_out() {
        let (dir, _) = unit_dir("parse", &[("good", ""), ("typo", "\nrestrat = 1\n")]);
        let (units, diags) = load_units(&dir.0, &Config::default());
        assert_eq!(names(&units), vec!["good"]);
        assert_eq!(diags.len(), 1);
        assert_eq!(
            (diags[0].file.clone(), diags[0].line),
            (dir.0.join("typo.toml"), 3)
        );
    }

    #[test]
    fn exec_must_be_executable() {
        let dir = temp_dir("noexec");
        let plain = dir.0.join("plain");
        write(&plain, "", 0o644);
        write(
            &dir.0.join("a.toml"),
            "description = \"x\"\nexec = [\"/nonexistent/tau-test-bin\"]\n",
            0o644,
        );
        write(
            &dir.0.join("b.toml"),
            &format!("\n\n exec = [\"{}\"]\n", plain.display()),
            0o644,
        );
        let (units, diags) = load_units(&dir.0, &Config::default());
        assert!(units.is_empty());
        assert_eq!(diags.len(), 2, "{diags:?}");
        assert_eq!(
            diags[0].to_string(),
            format!(
                "{}:2:1: `exec`: `/nonexistent/tau-test-bin` does not exist",
                dir.0.join("a.toml").display()
            )
        );
        assert_eq!((diags[1].line, diags[1].col), (3, 2));
        assert_eq!(
            diags[1].message,
            format!("`exec`: `{}` is not executable", plain.display())
        );
    }

    #[test]
    fn unknown_dependency() {
        let (dir, _) = unit_dir(
            "unknown",
            &[
                ("a", ""),
                ("b", "after = [\"a\"]\nrequires = [\"a\", \"ghost\"]\n"),
            ],
        );
        let (units, diags) = load_units(&dir.0, &Config::default());
        assert_eq!(names(&units), vec!["a"]);
        assert_eq!(diags.len(), 1, "{diags:?}");
        assert_eq!(diags[0].file, dir.0.join("b.toml"));
        assert_eq!((diags[0].line, diags[0].col), (3, 1));
        assert_eq!(diags[0].message, "`requires`: unknown unit `ghost`");
        let (dir, _) = unit_dir("unknown2", &[("a", "after = [\"nope\"]\n")]);
        let (units, diags) = load_units(&dir.0, &Config::default());
        assert!(units.is_empty());
        assert_eq!(
            (diags[0].line, diags[0].message.as_str()),
            (2, "`after`: unknown unit `nope`")
        );
    }

    fn cycle_messages(diags: &[Diagnostic]) -> Vec<(String, usize, String)> {
        diags
            .iter()
            .map(|d| {
                let f = d
                    .file
                    .file_name()
                    .and_then(|f| f.to_str())
                    .unwrap_or_default()
                    .to_string();
                (f, d.line, d.message.clone())
            })
            .collect()
    }

    #[test]
    fn two_cycle() {
        let (dir, _) = unit_dir(
            "cyc2",
            &[
                ("a", "after = [\"b\"]\n"),
                ("b", "requires = [\"a\"]\n"),
                ("c", ""),
            ],
        );
        let (units, diags) = load_units(&dir.0, &Config::default());
        assert_eq!(names(&units), vec!["c"]);
        assert_eq!(
            cycle_messages(&diags),
            vec![
                ("a.toml".into(), 2, "dependency cycle: a -> b -> a".into()),
                ("b.toml".into(), 2, "dependency cycle: b -> a -> b".into()),
            ]
        );
    }

    #[test]
    fn three_cycle_and_dependents() {
        let (dir, _) = unit_dir(
            "cyc3",
            &[
                ("a", "requires = [\"c\"]\n"),
                ("b", "after = [\"a\"]\n"),
                ("c", "after = [\"b\"]\n"),
                ("d", "requires = [\"a\"]\n"), // requires a cycle member: left out
                ("e", "after = [\"a\"]\n"),    // only ordered after it: kept
                ("f", "requires = [\"d\"]\n"), // transitively broken
            ],
        );
        let (units, diags) = load_units(&dir.0, &Config::default());
        assert_eq!(names(&units), vec!["e"]);
        assert_eq!(
            cycle_messages(&diags),
            vec![
                (
                    "a.toml".into(),
                    2,
                    "dependency cycle: a -> c -> b -> a".into()
                ),
                (
                    "b.toml".into(),
                    2,
                    "dependency cycle: b -> a -> c -> b".into()
                ),
                (
                    "c.toml".into(),
                    2,
                    "dependency cycle: c -> b -> a -> c".into()
                ),
                (
                    "d.toml".into(),
                    2,
                    "`requires`: unit `a` is invalid or was left out".into()
                ),
                (
                    "f.toml".into(),
                    2,
                    "`requires`: unit `d` is invalid or was left out".into()
                ),
            ]
        );
    }

    #[test]
    fn self_dependency() {
        let (dir, _) = unit_dir("self", &[("a", "\nrequires = [\"a\"]\n"), ("b", "")]);
        let (units, diags) = load_units(&dir.0, &Config::default());
        assert_eq!(names(&units), vec!["b"]);
        assert_eq!(
            cycle_messages(&diags),
            vec![("a.toml".into(), 3, "dependency cycle: a -> a".into())]
        );
    }

    #[test]
    fn requires_on_invalid_unit() {
        let (dir, _) = unit_dir(
            "reqbad",
            &[
                ("broken", "stop_signal = \"NOPE\"\n"),
                ("needs", "requires = [\"broken\"]\n"),
                ("orders", "after = [\"broken\"]\n"),
            ],
        );
        let (units, diags) = load_units(&dir.0, &Config::default());
        assert_eq!(names(&units), vec!["orders"]);
        assert_eq!(
            cycle_messages(&diags),
            vec![
                (
                    "broken.toml".into(),
                    2,
                    "`stop_signal`: unknown signal `NOPE`".into()
                ),
                (
                    "needs.toml".into(),
                    2,
                    "`requires`: unit `broken` is invalid or was left out".into()
                ),
            ]
        );
    }

    // ----- start order ----------------------------------------------------------------------

    fn mk(name: &str, priority: Priority, after: &[&str], requires: &[&str]) -> Unit {
        let mut u = unit(name, "exec = [\"/x\"]\n").unwrap();
        u.priority = priority;
        u.after = strings(after);
        u.requires = strings(requires);
        u
    }

    fn order_names(units: &[Unit]) -> Vec<&str> {
        start_order(units)
            .into_iter()
            .map(|i| units[i].name.as_str())
            .collect()
    }

    #[test]
    fn start_order_dependencies_first() {
        let units = vec![
            mk("session", Priority::Critical, &["display"], &["power"]),
            mk("display", Priority::High, &[], &["input"]),
            mk("input", Priority::Normal, &[], &[]),
            mk("power", Priority::Critical, &[], &[]),
        ];
        assert_eq!(
            order_names(&units),
            vec!["power", "input", "display", "session"]
        );
    }

    #[test]
    fn start_order_ties_by_priority_then_name() {
        let units = vec![
            mk("zeta", Priority::Background, &[], &[]),
            mk("beta", Priority::Normal, &[], &[]),
            mk("alpha", Priority::Normal, &[], &[]),
            mk("omega", Priority::Critical, &[], &[]),
            mk("late", Priority::Critical, &["zeta"], &[]),
            mk("mid", Priority::High, &["ghost"], &[]),
        ];
        assert_eq!(
            order_names(&units),
            vec!["omega", "mid", "alpha", "beta", "zeta", "late"]
        );
        assert_eq!(start_order(&units), vec![3, 5, 2, 1, 0, 4]);
        assert!(start_order(&[]).is_empty());
    }

    #[test]
    fn start_order_survives_cycles() {
        let units = vec![
            mk("a", Priority::Normal, &["b"], &[]),
            mk("b", Priority::Normal, &["a"], &[]),
            mk("c", Priority::Normal, &["a"], &[]),
            mk("d", Priority::Low, &[], &[]),
        ];
        assert_eq!(order_names(&units), vec!["d", "a", "b", "c"]);
    }
}
