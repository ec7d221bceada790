//! tau-init: PID 1 of TauOS, or a subreaper supervisor with `--foreground`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU8, Ordering};

use clap::Parser;
use tau_init::config::{self, Cmdline, CrashAction};
use tau_init::runtime::{Runtime, Setup};
use tau_init::supervisor::Mode;
use tau_init::{boot, log, sys};

/// Default config file.
const DEFAULT_CONFIG: &str = "/etc/tau/tau.toml";

#[derive(Parser, Debug, Default)]
#[command(
    name = "tau-init",
    version,
    about = "TauOS init: PID 1 with supervision and monitoring"
)]
struct Args {
    /// Run as a subreaper supervisor (not PID 1): for containers and tests.
    #[arg(long)]
    foreground: bool,
    /// Check config and units, print every problem as file:line:col, exit 1 on any.
    #[arg(long)]
    validate: bool,
    /// Config file (default /etc/tau/tau.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Units directory (overrides [system] units_dir).
    #[arg(long, value_name = "DIR")]
    units: Option<PathBuf>,
    /// Runtime directory (overrides [system] run_dir).
    #[arg(long = "run-dir", value_name = "DIR")]
    run_dir: Option<PathBuf>,
    /// Boot in safe mode: only units marked safe_mode.
    #[arg(long = "safe-mode")]
    safe_mode: bool,
    /// Detach: run the supervisor in the background (as --foreground), log to <run-dir>/tau-init.log.
    #[arg(long)]
    daemon: bool,
    /// Print one health report and exit 0 healthy, 1 degraded, 2 critical.
    #[arg(long)]
    check: bool,
    /// Internal: state file handed over by `taucli reexec`.
    #[arg(long, value_name = "FILE", hide = true)]
    resume: Option<PathBuf>,
    /// Internal: set by `taucli reexec` when a kernel booted the previous instance.
    #[arg(long, hide = true)]
    booted: bool,
}

/// As PID 1 the kernel hands us the command-line words it did not understand (`single`,
/// `quiet`, ...): keep only our own flags (and their values) so they still take effect.
fn known_flags(argv: impl Iterator<Item = OsString>) -> Vec<OsString> {
    const WITH_VALUE: [&str; 4] = ["--config", "--units", "--run-dir", "--resume"];
    const SWITCHES: [&str; 7] = [
        "--booted",
        "--foreground",
        "--validate",
        "--safe-mode",
        "--daemon",
        "--check",
        "--version",
    ];
    let mut out = Vec::new();
    let mut it = argv.into_iter();
    if let Some(a0) = it.next() {
        out.push(a0);
    }
    while let Some(a) = it.next() {
        // Words that are not UTF-8 are not ours (our flags are ASCII; values may be anything).
        let text = a.to_string_lossy();
        let name = text.split('=').next().unwrap_or_default();
        if WITH_VALUE.contains(&name) {
            let needs_value = !text.contains('=');
            out.push(a);
            if needs_value && let Some(v) = it.next() {
                out.push(v);
            }
        } else if SWITCHES.contains(&text.as_ref()) {
            out.push(a);
        }
    }
    out
}

static CRASH: AtomicU8 = AtomicU8::new(0);

fn crash_code(a: CrashAction) -> u8 {
    match a {
        CrashAction::Shell => 0,
        CrashAction::Reboot => 1,
        CrashAction::Poweroff => 2,
        CrashAction::Freeze => 3,
    }
}

/// A panic escaped the loop as PID 1: sync and take the configured crash action.
fn crash_action() -> ! {
    sys::sync();
    match CRASH.load(Ordering::Relaxed) {
        1 => {
            let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
        }
        2 => {
            let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
        }
        3 => {}
        _ => {
            eprintln!("tau-init: starting an emergency shell on the console");
            sys::exec_emergency_shell();
            eprintln!("tau-init: no /bin/sh; freezing");
        }
    }
    sys::freeze()
}

fn main() -> ExitCode {
    let pid1 = std::process::id() == 1;
    // As PID 1 the kernel passes leftover command-line words: tolerate them.
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if !pid1 => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
        Err(_) => Args::try_parse_from(known_flags(std::env::args_os())).unwrap_or_default(),
    };
    std::panic::set_hook(Box::new(|info| {
        let msg = format!("tau-init: internal error: {info}\n");
        let _ = std::io::Write::write_all(&mut std::io::stderr(), msg.as_bytes());
    }));
    // PID 1 must never return: the one-shot modes are for a shell, not for the kernel.
    if args.validate && !pid1 {
        return validate(&args);
    }
    if args.check && !pid1 {
        // The health score is computed from resource monitoring, which this build lacks.
        eprintln!("tau-init: health report not available yet: resource monitoring is not built in");
        return ExitCode::from(3);
    }
    if args.daemon && !pid1 {
        // Same run dir as the supervisor will use: flag, else config, else the default.
        let log_dir = args.run_dir.clone().unwrap_or_else(|| {
            let (path, explicit) = config_path(&args, None);
            config::load_config_or_default(&path, explicit)
                .map(|c| c.system.run_dir)
                .unwrap_or_else(|_| PathBuf::from("/run/tau"))
        });
        match sys::daemonize(&log_dir.join("tau-init.log")) {
            Ok(true) => return ExitCode::SUCCESS,
            Ok(false) => {}
            Err(e) => {
                eprintln!("tau-init: --daemon: {e}");
                return ExitCode::from(1);
            }
        }
    }
    if !pid1 && !args.foreground && !args.daemon {
        eprintln!(
            "tau-init: not PID 1; use --foreground to supervise as a subreaper, or --validate"
        );
        return ExitCode::from(2);
    }
    let result = std::panic::catch_unwind(|| run(args, pid1));
    match result {
        Ok(code) if !pid1 => code,
        Ok(_) => sys::freeze(),
        Err(_) if pid1 => crash_action(),
        Err(_) => ExitCode::from(1),
    }
}

fn validate(args: &Args) -> ExitCode {
    let (path, explicit) = config_path(args, None);
    let mut problems = 0usize;
    let cfg = match config::load_config_or_default(&path, explicit) {
        Ok(c) => c,
        Err(diags) => {
            for d in &diags {
                println!("{d}");
            }
            problems += diags.len();
            config::Config::default()
        }
    };
    let units_dir = args
        .units
        .clone()
        .unwrap_or_else(|| cfg.system.units_dir.clone());
    let (units, diags) = config::load_units(&units_dir, &cfg);
    for d in &diags {
        println!("{d}");
    }
    problems += diags.len();
    if problems == 0 {
        println!(
            "ok: {} and {} units in {}",
            path.display(),
            units.len(),
            units_dir.display()
        );
        ExitCode::SUCCESS
    } else {
        println!("{problems} problem(s) found");
        ExitCode::from(1)
    }
}

/// Config path from the flag, the kernel command line, or the default; and whether it was
/// named explicitly (then it must exist).
fn config_path(args: &Args, cmdline: Option<&Cmdline>) -> (PathBuf, bool) {
    if let Some(p) = &args.config {
        return (p.clone(), true);
    }
    if let Some(p) = cmdline.and_then(|c| c.config.clone()) {
        return (p, true);
    }
    (PathBuf::from(DEFAULT_CONFIG), false)
}

fn run(args: Args, pid1: bool) -> ExitCode {
    let mut cmdline = Cmdline::default();
    // After `taucli reexec` the previous instance already did the boot-time work.
    let resume = match &args.resume {
        Some(p) => match tau_init::runtime::ResumeState::take(p) {
            Ok(r) => Some(r),
            Err(e) => {
                log::error(&format!(
                    "reexec: cannot resume ({e}); starting units afresh"
                ));
                None
            }
        },
        None => None,
    };
    let resumed = resume.is_some();
    let booted = match &resume {
        Some(r) => r.booted,
        None => args.booted || (pid1 && boot::booted_by_kernel()),
    };
    if args.resume.is_some() && !resumed {
        // The previous instance's units are still running but unknown to us: stop them before
        // starting afresh, or every service would run twice.
        log::error("reexec: stopping the previous instance's processes before starting afresh");
        sys::stop_own_children(2000);
    }
    if booted {
        if !resumed {
            boot::mount_api_filesystems();
            boot::ensure_console();
        }
        log::use_nonblocking_console();
        if !resumed && let Err(e) = nix::sys::reboot::set_cad_enabled(false) {
            log::debug(&format!("disable ctrl-alt-del: {}", e.desc()));
        }
        cmdline = config::parse_cmdline(&String::from_utf8_lossy(
            &std::fs::read("/proc/cmdline").unwrap_or_default(),
        ));
        CRASH.store(crash_code(cmdline.crash), Ordering::Relaxed);
        for w in &cmdline.warnings {
            log::warn(&format!("kernel command line: {w}"));
        }
    } else if pid1 {
        log::info("PID 1 in a container or PID namespace: API filesystems are already mounted");
    } else if let Err(e) = sys::set_child_subreaper() {
        log::error(&format!(
            "PR_SET_CHILD_SUBREAPER: {}; orphans will not be reaped",
            e.desc()
        ));
    }
    if let Some(l) = cmdline.log.as_deref().and_then(log::parse_level) {
        log::set_level(l);
    }
    let mut mode = if cmdline.safe_mode || args.safe_mode {
        Mode::Safe
    } else {
        Mode::Normal
    };
    let (path, explicit) = config_path(&args, Some(&cmdline));
    let mut config_ok = true;
    let cfg = match config::load_config_or_default(&path, explicit) {
        Ok(c) => c,
        Err(diags) => {
            config_ok = false;
            for d in &diags {
                log::error(&format!("config: {d}"));
            }
            if !pid1 {
                return ExitCode::from(1);
            }
            log::error("config is broken: booting in safe mode with built-in defaults");
            mode = Mode::Safe;
            config::Config::default()
        }
    };
    if cmdline.log.is_none()
        && let Some(l) = log::parse_level(&cfg.system.log_level)
    {
        log::set_level(l);
    }
    log::info(&format!(
        "tau-init {} starting as {}",
        env!("CARGO_PKG_VERSION"),
        if pid1 {
            "PID 1"
        } else {
            "subreaper supervisor"
        }
    ));
    let mut persistent_mounted = false;
    if booted && !resumed {
        boot::set_hostname(&cfg.system.hostname);
        boot::load_modules(&cfg.system.module_dir, &cfg.system.modules);
        persistent_mounted = boot::mount_persistent(
            &cfg.system.persistent_device,
            &cfg.system.persistent_fstype,
            &cfg.system.persistent_mount,
            2000,
        );
    }
    let mut overrides: Vec<(&str, &str)> = Vec::new();
    if args.units.is_some() {
        overrides.push(("system.units_dir", "command line"));
    } else if cmdline.units.is_some() {
        overrides.push(("system.units_dir", "kernel command line"));
    }
    if args.run_dir.is_some() {
        overrides.push(("system.run_dir", "command line"));
    }
    let units_dir = args
        .units
        .clone()
        .or(cmdline.units.clone())
        .unwrap_or_else(|| cfg.system.units_dir.clone());
    let (units, diags) = tau_init::runtime::load_unit_set(&units_dir, &cfg, booted);
    for d in &diags {
        log::error(&format!("unit: {d}"));
    }
    let run_dir = args
        .run_dir
        .clone()
        .unwrap_or_else(|| cfg.system.run_dir.clone());
    // Reply paths are compared with <run-dir>/reply: it must be absolute.
    let run_dir = std::path::absolute(&run_dir).unwrap_or(run_dir);
    let mut shown = cfg.clone();
    shown.system.units_dir = units_dir.clone();
    shown.system.run_dir = run_dir.clone();
    // A config that failed to load contributed nothing: every value is a built-in default.
    let file_text = if config_ok {
        std::fs::read_to_string(&path).ok()
    } else {
        None
    };
    let config_view =
        tau_init::control::view::config_view(&shown, &path, file_text.as_deref(), &overrides);
    let setup = Setup {
        config: cfg,
        units,
        run_dir,
        pid1,
        booted,
        mode,
        persistent_mounted,
        units_dir,
        config_view,
        argv: std::env::args_os().collect(),
        resume,
    };
    let mut rt = match Runtime::new(setup) {
        Ok(rt) => rt,
        Err(e) => {
            log::error(&format!("cannot set up the event loop: {e}"));
            if pid1 {
                crash_action();
            }
            return ExitCode::from(1);
        }
    };
    let kind = rt.run();
    if pid1 {
        rt.power_off(kind);
    }
    rt.save_now();
    log::info("all units stopped; exiting");
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn kernel_leftovers_are_dropped_and_our_flags_kept() {
        let argv = [
            "/init",
            "single",
            "quiet",
            "--resume",
            "/run/tau/reexec-state.json",
            "--run-dir=/run/x",
            "-s",
        ];
        let kept = known_flags(argv.iter().map(OsString::from));
        assert_eq!(
            kept,
            vec![
                "/init",
                "--resume",
                "/run/tau/reexec-state.json",
                "--run-dir=/run/x"
            ]
        );
        let a = Args::try_parse_from(kept).unwrap();
        assert_eq!(
            a.resume.as_deref(),
            Some(Path::new("/run/tau/reexec-state.json"))
        );
        assert_eq!(a.run_dir.as_deref(), Some(Path::new("/run/x")));
    }
}
