//! tau-init: the PID 1 of TauOS, a supervisor with embedded monitoring.
//!
//! Pure logic (config parsing, the unit state machine, the restart policy, protocol parsing)
//! lives apart from the syscalls, which are confined to [`sys`] and thin edges of the loop.

/// PID 1's boot and power-off steps: API filesystems, console, modules, persistent disk.
pub mod boot;
/// cgroup v2 pools per priority and per-unit cgroups with limits.
pub mod cgroup;
/// Config file, unit files and kernel command line: parsing and validation (pure).
pub mod config;
/// The control FIFO: protocol, server side, client side, and the views it answers with.
pub mod control;
/// The deadline queue that drives every timer of the loop.
pub mod event;
/// Console log and the in-memory ring of recent records.
pub mod log;
/// sd_notify-compatible readiness socket.
pub mod notify;
/// tau-init's own durable state, saved atomically.
pub mod persist;
/// The single-threaded event loop that carries out the supervisor's actions.
pub mod runtime;
/// The unit state machine and restart policy (pure).
pub mod supervisor;
/// The only module with `unsafe`: raw syscalls and the child side of spawn.
#[allow(unsafe_code)]
pub mod sys;
