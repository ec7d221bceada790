//! QEMU boot tests: Debian's kernel boots the TauOS initramfs with tau-init as PID 1, and the
//! in-guest driver `tests/qemu-units/bin/tau-qemu-test` checks many things per boot, printing
//! `TAU-TEST: <check> ok|fail <detail>` on the serial console.
//!
//! Enabled by `TAU_QEMU=1` (tests/run-all.sh sets it after fetching the kernel and building the
//! image with `--units qemu/check-units --units tests/qemu-units`); otherwise each test prints
//! why it is skipped. Four boots in all: two sharing a persistent disk, one with
//! `tau.mode=safe`, one with a broken config.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if Path::new(&d).is_absolute() => PathBuf::from(d),
        Some(d) => repo().join(d),
        None => repo().join("target"),
    }
}

fn enabled() -> bool {
    if std::env::var("TAU_QEMU").as_deref() != Ok("1") {
        println!("skipped: set TAU_QEMU=1 (tests/run-all.sh does) to run the QEMU boot tests");
        return false;
    }
    let image = target_dir().join("tauos-initramfs.cpio.gz");
    assert!(
        image.exists(),
        "TAU_QEMU=1 but no image at {}: run tests/run-all.sh",
        image.display()
    );
    true
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tau-qemu-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// One boot's console and outcome.
struct Boot {
    log: String,
    status: Option<i32>,
    log_path: PathBuf,
    secs: f64,
}

impl Boot {
    fn checks(&self) -> Vec<(String, bool, String)> {
        self.log
            .lines()
            .filter_map(|l| {
                let rest = l.trim_end_matches('\r').split("TAU-TEST: ").nth(1)?;
                let mut parts = rest.splitn(3, ' ');
                let name = parts.next()?.to_string();
                let verdict = parts.next().unwrap_or("");
                let detail = parts.next().unwrap_or("").to_string();
                match verdict {
                    "ok" => Some((name, true, detail)),
                    "fail" => Some((name, false, detail)),
                    _ => Some((name, true, format!("{verdict} {detail}").trim().to_string())),
                }
            })
            .collect()
    }

    /// The detail of an informational line (`TAU-TEST: token VALUE`).
    fn value(&self, name: &str) -> Option<String> {
        self.checks()
            .into_iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, _, d)| d)
    }

    /// Every listed check reported ok; and nothing failed.
    fn assert_ok(&self, expected: &[&str]) {
        let checks = self.checks();
        let failed: Vec<_> = checks.iter().filter(|(_, ok, _)| !ok).collect();
        assert!(
            failed.is_empty(),
            "failed checks {failed:?}\nconsole: {}",
            self.log_path.display()
        );
        for want in expected {
            assert!(
                checks.iter().any(|(n, ok, _)| n == want && *ok),
                "check {want} not reported ok (have {:?})\nconsole: {}",
                checks.iter().map(|c| &c.0).collect::<Vec<_>>(),
                self.log_path.display()
            );
        }
    }

    /// The console shows `needle`; `what` says why it matters.
    fn assert_log(&self, needle: &str, what: &str) {
        assert!(
            self.log.contains(needle),
            "{what}: no {needle:?} on the console {}",
            self.log_path.display()
        );
    }

    /// The guest powered itself off through tau-init (QEMU exited 0 on its own).
    fn assert_clean_poweroff(&self, scenario: &str) {
        self.assert_log(
            &format!("TAU-TEST-DONE {scenario}"),
            "driver did not finish",
        );
        self.assert_log("shutdown: all units stopped", "no orderly stop");
        self.assert_log("reboot: Power down", "no power-off");
        assert_eq!(
            self.status,
            Some(0),
            "qemu exit status (console {})",
            self.log_path.display()
        );
        assert!(
            !self.log.contains("Kernel panic"),
            "kernel panic: {}",
            self.log_path.display()
        );
    }

    /// Line number of the first console line containing `needle`.
    fn line_of(&self, needle: &str) -> usize {
        self.log
            .lines()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle:?} not on the console {}", self.log_path.display()))
    }
}

fn boot(scenario: &str, append: &str, disk: Option<&Path>, dir: &Path) -> Boot {
    let log_path = dir.join(format!("{scenario}.log"));
    let mut cmd = Command::new(repo().join("qemu/run.sh"));
    cmd.args(["--no-build", "-q", "--timeout", "150", "--log"])
        .arg(&log_path)
        .args(["--append", &format!("tau_test={scenario} {append}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(d) = disk {
        cmd.arg("--disk").arg(d);
    }
    let start = Instant::now();
    let status = cmd.status().expect("run qemu/run.sh").code();
    let secs = start.elapsed().as_secs_f64();
    let log = String::from_utf8_lossy(&std::fs::read(&log_path).unwrap_or_default()).into_owned();
    println!(
        "boot {scenario}: {secs:.1} s, qemu/run.sh exit {status:?}, console {}",
        log_path.display()
    );
    Boot {
        log,
        status,
        log_path,
        secs,
    }
}

/// Read a file from an ext4 image with debugfs (e2fsprogs), without mounting it.
fn debugfs_cat(disk: &Path, path: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(disk)
        .output()
        .expect("debugfs");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn boot_crash_recovery_persistence_and_safe_mode_fallback() {
    if !enabled() {
        return;
    }
    let dir = scratch("persist");
    let disk = dir.join("disk.img");

    // Boot 1: fresh disk.
    let b1 = boot("boot1", "", Some(&disk), &dir);
    b1.assert_ok(&[
        "critical-running",
        "persistent-disk",
        "cgroup2-mounted",
        "cgroup-controllers",
        "cgroup-placement",
        "cgroup-memory-limit",
        "cgroup-pool-weight",
        "zombies-reaped",
        "state-dir-mode",
        "session-state-crash",
        "last-exit-recorded",
        "reexec-keeps-pids",
    ]);
    b1.assert_clean_poweroff("boot1");
    // taucli poweroff stopped everything in order: lower priorities and dependents first.
    let order: Vec<usize> = [
        "sandboxd",
        "tau-session",
        "tau-displaysvc",
        "tau-inputd",
        "tau-powerd",
    ]
    .iter()
    .map(|u| b1.line_of(&format!("tau-init: info: {u}: stopping")))
    .collect();
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "stop order {order:?}: {}",
        b1.log_path.display()
    );
    assert!(b1.line_of("unmounted /var") > order[4]);
    // Data the driver wrote just before power-off is on the disk.
    let token = b1.value("token").expect("token line");
    assert!(token.starts_with("tok-"), "{token}");
    assert_eq!(
        debugfs_cat(&disk, "/lib/tau/session_state/qemu-test/last-words"),
        token
    );
    assert!(debugfs_cat(&disk, "/lib/tau/tau-init.state.json").contains("tau-inputd"));

    // Boot 2: same disk; then a critical unit crashes past max_attempts.
    let b2 = boot("boot2", "", Some(&disk), &dir);
    b2.assert_ok(&[
        "critical-running",
        "session-state-reboot",
        "crash-history-reboot",
        "safe-mode-fallback",
        "safe-mode-stops-others",
        "critical-unit-failed",
        "safe-units-running",
        "emergency-shell",
    ]);
    assert_eq!(
        b2.value("last-words").as_deref(),
        Some(token.as_str()),
        "{}",
        b2.log_path.display()
    );
    b2.assert_log(
        "entering safe mode: critical unit tau-session failed",
        "the safe-mode fallback must say why",
    );
    b2.assert_clean_poweroff("boot2");
    println!("persistence suite: {:.1} s of boots", b1.secs + b2.secs);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn kernel_command_line_safe_mode() {
    if !enabled() {
        return;
    }
    let dir = scratch("safe");
    let b = boot("safe", "tau.mode=safe tau.bogus=1", None, &dir);
    b.assert_ok(&[
        "mode-safe",
        "emergency-shell",
        "only-safe-units",
        "safe-units-running",
    ]);
    b.assert_log(
        "warn: kernel command line: `tau.bogus=1`: unknown tau option, ignored",
        "unknown tau.* argument must be warned about",
    );
    b.assert_log("/var is tmpfs", "no-disk boot must say /var is tmpfs");
    b.assert_clean_poweroff("safe");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn broken_config_boots_safe_mode_and_says_why() {
    if !enabled() {
        return;
    }
    let dir = scratch("broken");
    let b = boot("broken", "tau.config=/etc/tau/broken.toml", None, &dir);
    b.assert_ok(&["mode-safe", "error-logged", "built-in-defaults"]);
    b.assert_log(
        "config is broken: booting in safe mode with built-in defaults",
        "a broken config must be announced",
    );
    b.assert_log(
        "/etc/tau/broken.toml:3:",
        "the config error must name file and line",
    );
    b.assert_clean_poweroff("broken");
    let _ = std::fs::remove_dir_all(&dir);
}
