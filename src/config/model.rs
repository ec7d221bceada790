//! Typed model of `tau.toml` and of unit files, as deserialized by serde.
//!
//! Every struct denies unknown fields so that a typo is an error naming the key, and every
//! field has a default documented in README.md.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The whole `tau.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[system]`: paths, modules, persistence, console.
    pub system: System,
    /// `[resource_monitoring]` from the design.
    pub resource_monitoring: ResourceMonitoring,
    /// `[process_management]` from the design.
    pub process_management: ProcessManagement,
    /// `[crash_recovery]` from the design.
    pub crash_recovery: CrashRecovery,
    /// `[health_checking]` from the design.
    pub health_checking: HealthChecking,
}

/// `[system]`: where things live and what PID 1 does at boot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct System {
    /// Directory of unit files (`*.toml`, name = file stem).
    pub units_dir: PathBuf,
    /// Runtime directory: control FIFO, reply FIFOs, notify socket.
    pub run_dir: PathBuf,
    /// Where tau-init keeps its own durable state (crash history, counters).
    pub state_dir: PathBuf,
    /// Kernel modules to load before mounting the persistent disk, in order.
    /// Each entry is a path to a `.ko` file, absolute or relative to `module_dir`.
    pub modules: Vec<String>,
    /// Base directory for relative `modules` entries.
    pub module_dir: PathBuf,
    /// Block device holding persistent data (mounted at `persistent_mount` when present).
    pub persistent_device: String,
    /// Filesystem type of `persistent_device`.
    pub persistent_fstype: String,
    /// Mount point of the persistent disk; tmpfs when the device is absent.
    pub persistent_mount: PathBuf,
    /// Hostname set at boot as PID 1 (empty: leave unchanged).
    pub hostname: String,
    /// Log level: error, warn, info, debug.
    pub log_level: String,
    /// Group allowed to send read-only queries on the control FIFO (empty: root only).
    pub control_group: String,
    /// Time given to all remaining processes after SIGTERM at shutdown before SIGKILL.
    pub shutdown_kill_timeout_ms: u64,
    /// Where cgroup2 is mounted; tau-init builds its pools under `<cgroup_root>/tau`.
    pub cgroup_root: PathBuf,
    /// Audit log of mutating control commands (JSON lines).
    pub audit_log: PathBuf,
}

impl Default for System {
    fn default() -> Self {
        Self {
            units_dir: PathBuf::from("/etc/tau/units"),
            run_dir: PathBuf::from("/run/tau"),
            state_dir: PathBuf::from("/var/lib/tau"),
            modules: Vec::new(),
            module_dir: PathBuf::from("/lib/modules"),
            persistent_device: "/dev/vda".to_string(),
            persistent_fstype: "ext4".to_string(),
            persistent_mount: PathBuf::from("/var"),
            hostname: "tauos".to_string(),
            log_level: "info".to_string(),
            control_group: String::new(),
            shutdown_kill_timeout_ms: 3000,
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            audit_log: PathBuf::from("/var/log/tau/audit.log"),
        }
    }
}

/// `[resource_monitoring]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResourceMonitoring {
    pub enabled: bool,
    pub interval_seconds: u64,
    pub cpu_threshold_percent: f64,
    pub memory_threshold_percent: f64,
    pub disk_threshold_percent: f64,
    pub network_monitoring: bool,
    pub temperature_monitoring: bool,
    pub alert_on_threshold: bool,
    pub log_resource_usage: bool,
}

impl Default for ResourceMonitoring {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_seconds: 30,
            cpu_threshold_percent: 80.0,
            memory_threshold_percent: 85.0,
            disk_threshold_percent: 90.0,
            network_monitoring: true,
            temperature_monitoring: true,
            alert_on_threshold: true,
            log_resource_usage: true,
        }
    }
}

/// `[process_management]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessManagement {
    pub enabled: bool,
    /// Most units running at once; also `pids.max` of the services subtree (x16).
    pub max_concurrent_processes: u32,
    /// Must be 5: critical, high, normal, low, background.
    pub process_priority_levels: u32,
    /// Default `memory.max` of each unit's cgroup, MiB (0: no limit).
    pub memory_limit_mb: u64,
    /// Default `cpu.max` of each unit's cgroup, percent of one CPU (0: no limit).
    pub cpu_limit_percent: f64,
    /// Reap orphans (always on as PID 1; off only means they are not logged).
    pub auto_cleanup_zombies: bool,
    /// Put each unit in its own cgroup under its priority pool.
    pub process_isolation: bool,
    /// Create one cgroup pool per priority with weights.
    pub resource_pooling: bool,
}

impl Default for ProcessManagement {
    fn default() -> Self {
        Self {
            enabled: true,
            max_concurrent_processes: 100,
            process_priority_levels: 5,
            memory_limit_mb: 2048,
            cpu_limit_percent: 50.0,
            auto_cleanup_zombies: true,
            process_isolation: true,
            resource_pooling: true,
        }
    }
}

/// `[crash_recovery]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CrashRecovery {
    pub enabled: bool,
    /// Restart crashed units at all (false: every crash is handled as `notify_admin`).
    pub auto_recovery: bool,
    pub max_recovery_attempts: u32,
    /// Window in which failures count against `max_attempts`; also the default `reset_after_ms`.
    pub recovery_timeout_seconds: u64,
    pub save_session_state: bool,
    pub session_state_path: PathBuf,
    pub critical_processes: Vec<String>,
}

impl Default for CrashRecovery {
    fn default() -> Self {
        Self {
            enabled: true,
            auto_recovery: true,
            max_recovery_attempts: 3,
            recovery_timeout_seconds: 60,
            save_session_state: true,
            session_state_path: PathBuf::from("/var/lib/tau/session_state"),
            critical_processes: Vec::new(),
        }
    }
}

/// `[health_checking]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthChecking {
    pub enabled: bool,
    pub check_interval_seconds: u64,
    pub system_health_checks: Vec<String>,
    pub service_health_checks: Vec<String>,
    pub alert_on_failure: bool,
    pub auto_restart_failed_services: bool,
    pub health_score_threshold: f64,
}

impl Default for HealthChecking {
    fn default() -> Self {
        Self {
            enabled: true,
            check_interval_seconds: 60,
            system_health_checks: Vec::new(),
            service_health_checks: Vec::new(),
            alert_on_failure: true,
            auto_restart_failed_services: true,
            health_score_threshold: 0.7,
        }
    }
}

/// Priority pool of a unit. Order: critical starts first and stops last.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Critical,
    High,
    #[default]
    Normal,
    Low,
    Background,
}

impl Priority {
    /// All priorities, most important first.
    pub const ALL: [Priority; 5] = [
        Priority::Critical,
        Priority::High,
        Priority::Normal,
        Priority::Low,
        Priority::Background,
    ];

    /// The name used in unit files, cgroup paths and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
            Priority::Background => "background",
        }
    }
}

/// Readiness protocol of a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Ready {
    /// Running as soon as exec succeeded.
    #[default]
    None,
    /// Running once the unit sends `READY=1` to `$NOTIFY_SOCKET`.
    Notify,
}

/// Recovery strategy, spelled exactly as in the design.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    #[default]
    Restart,
    RestartWithDelay,
    RestartWithBackoff,
    FallbackToSafeMode,
    NotifyAdmin,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Restart => "restart",
            Strategy::RestartWithDelay => "restart_with_delay",
            Strategy::RestartWithBackoff => "restart_with_backoff",
            Strategy::FallbackToSafeMode => "fallback_to_safe_mode",
            Strategy::NotifyAdmin => "notify_admin",
        }
    }
}

/// A unit file as written (before defaults from `tau.toml` are resolved).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct UnitFile {
    pub description: String,
    pub exec: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub working_dir: Option<PathBuf>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub priority: Priority,
    pub critical: bool,
    pub after: Vec<String>,
    pub requires: Vec<String>,
    pub safe_mode: bool,
    /// Only in safe mode (e.g. an emergency shell); implies `safe_mode`.
    pub safe_mode_only: bool,
    /// Start at boot (false: only by `taucli start`).
    pub enabled: Option<bool>,
    pub stop_signal: Option<String>,
    pub stop_timeout_ms: Option<u64>,
    pub ready: Ready,
    pub ready_timeout_ms: Option<u64>,
    /// Attach stdin/stdout/stderr to the console (for shells); default: stdout/stderr to console, stdin /dev/null.
    pub console: bool,
    /// cgroup `memory.max` in MiB (overrides `[process_management] memory_limit_mb`; 0 = none).
    pub memory_limit_mb: Option<u64>,
    /// cgroup `cpu.max` in percent of one CPU (overrides `[process_management] cpu_limit_percent`; 0 = none).
    pub cpu_limit_percent: Option<f64>,
    pub recovery: RecoveryFile,
}

/// `[recovery]` of a unit file as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RecoveryFile {
    pub strategy: Strategy,
    pub delay_ms: Option<u64>,
    pub backoff_initial_ms: Option<u64>,
    pub backoff_max_ms: Option<u64>,
    pub backoff_factor: Option<f64>,
    pub max_attempts: Option<u32>,
    pub reset_after_ms: Option<u64>,
}

/// A unit after validation, with every default resolved: what the supervisor runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unit {
    /// File stem of the unit file.
    pub name: String,
    /// Path of the unit file it came from.
    pub path: PathBuf,
    pub description: String,
    /// argv; `exec[0]` is an absolute path to an executable file.
    pub exec: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub working_dir: Option<PathBuf>,
    /// Numeric ids resolved from `user`/`group` (names through /etc/passwd, /etc/group).
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub priority: Priority,
    /// `critical = true` or named in `[crash_recovery] critical_processes`.
    pub critical: bool,
    pub after: Vec<String>,
    pub requires: Vec<String>,
    pub safe_mode: bool,
    pub safe_mode_only: bool,
    pub enabled: bool,
    /// Signal number (e.g. 15 for "SIGTERM"/"TERM"/"15").
    pub stop_signal: i32,
    pub stop_timeout_ms: u64,
    pub ready: Ready,
    pub ready_timeout_ms: u64,
    pub console: bool,
    /// 0 = no limit.
    pub memory_limit_mb: u64,
    /// 0.0 = no limit.
    pub cpu_limit_percent: f64,
    pub recovery: Recovery,
}

/// `[recovery]` with defaults resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recovery {
    pub strategy: Strategy,
    pub delay_ms: u64,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    pub backoff_factor: f64,
    pub max_attempts: u32,
    pub reset_after_ms: u64,
}
