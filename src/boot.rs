//! What PID 1 does before the loop: the API filesystems, the console, kernel modules, the
//! persistent disk, and the final power-off. Each step logs and carries on when it fails.

use std::fs;
use std::path::Path;

use nix::mount::{MntFlags, MsFlags, mount, umount2};

use crate::log;

/// One API filesystem PID 1 mounts where nothing is mounted yet.
struct ApiMount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// The declarative table of API filesystems, mounted in order.
fn api_mounts() -> [ApiMount; 8] {
    [
        ApiMount {
            source: "proc",
            target: "/proc",
            fstype: "proc",
            flags: NOSUID_NODEV_NOEXEC,
            data: None,
        },
        ApiMount {
            source: "sysfs",
            target: "/sys",
            fstype: "sysfs",
            flags: NOSUID_NODEV_NOEXEC,
            data: None,
        },
        ApiMount {
            source: "devtmpfs",
            target: "/dev",
            fstype: "devtmpfs",
            flags: MsFlags::MS_NOSUID,
            data: Some("mode=0755"),
        },
        ApiMount {
            source: "devpts",
            target: "/dev/pts",
            fstype: "devpts",
            flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
            data: Some("gid=5,mode=620,ptmxmode=000"),
        },
        ApiMount {
            source: "tmpfs",
            target: "/dev/shm",
            fstype: "tmpfs",
            flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
            data: Some("mode=1777"),
        },
        ApiMount {
            source: "tmpfs",
            target: "/run",
            fstype: "tmpfs",
            flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
            data: Some("mode=0755"),
        },
        ApiMount {
            source: "cgroup2",
            target: "/sys/fs/cgroup",
            fstype: "cgroup2",
            flags: NOSUID_NODEV_NOEXEC,
            data: Some("nsdelegate"),
        },
        ApiMount {
            source: "tmpfs",
            target: "/tmp",
            fstype: "tmpfs",
            flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
            data: Some("mode=1777"),
        },
    ]
}

/// Mount points listed in a `/proc/self/mounts` text (pure).
pub fn mount_points(mounts: &str) -> Vec<String> {
    mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|p| p.replace("\\040", " "))
        .collect()
}

/// Is `target` a mount point? Reads /proc/self/mounts (which exists once /proc is mounted).
fn is_mounted(target: &str) -> bool {
    fs::read_to_string("/proc/self/mounts")
        .map(|m| mount_points(&m).iter().any(|p| p == target))
        .unwrap_or(false)
}

/// True when a kernel started us on a bare root (no /proc yet). In a container or a test's PID
/// namespace /proc is already there, and tau-init then mounts nothing and leaves disks alone.
pub fn booted_by_kernel() -> bool {
    !Path::new("/proc/self/mounts").exists()
}

/// Mount every API filesystem that is not mounted yet.
pub fn mount_api_filesystems() {
    for m in api_mounts() {
        if is_mounted(m.target) {
            continue;
        }
        if let Err(e) = fs::create_dir_all(m.target) {
            log::warn(&format!("mkdir {}: {e}", m.target));
            continue;
        }
        match mount(Some(m.source), m.target, Some(m.fstype), m.flags, m.data) {
            Ok(()) => log::debug(&format!("mounted {} on {}", m.fstype, m.target)),
            Err(e) => log::warn(&format!("mount {} on {}: {}", m.fstype, m.target, e.desc())),
        }
    }
}

/// If fd 0..2 are not open (no /dev/console in the initramfs when the kernel started us),
/// open the console now that devtmpfs is there.
pub fn ensure_console() {
    if crate::sys::stdio_open() {
        return;
    }
    if let Ok(f) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        use std::os::fd::AsFd;
        let _ = nix::unistd::dup2_stdin(f.as_fd());
        let _ = nix::unistd::dup2_stdout(f.as_fd());
        let _ = nix::unistd::dup2_stderr(f.as_fd());
    }
}

/// Load kernel modules in order with `finit_module`. A module already loaded (EEXIST) is fine.
pub fn load_modules(dir: &Path, modules: &[String]) {
    for m in modules {
        let path = if Path::new(m).is_absolute() {
            Path::new(m).to_path_buf()
        } else {
            dir.join(m)
        };
        let file = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                log::warn(&format!("module {}: {e}", path.display()));
                continue;
            }
        };
        match crate::sys::finit_module(&file, c"") {
            Ok(()) => log::info(&format!("loaded module {}", path.display())),
            Err(nix::errno::Errno::EEXIST) => {
                log::debug(&format!("module {} already loaded", path.display()))
            }
            Err(e) => log::warn(&format!("module {}: {}", path.display(), e.desc())),
        }
    }
}

/// Mount the persistent disk on `target`, waiting up to `wait_ms` for the device node; mount a
/// tmpfs there instead when the device is absent or fails to mount. Returns true when the disk
/// is mounted.
pub fn mount_persistent(device: &str, fstype: &str, target: &Path, wait_ms: u64) -> bool {
    if device.is_empty() {
        return false;
    }
    if target.to_str().is_some_and(is_mounted) {
        // Already there (a restarted tau-init): never stack a second mount.
        log::info(&format!("{} is already mounted", target.display()));
        return true;
    }
    let _ = fs::create_dir_all(target);
    let dev = Path::new(device);
    // The driver probes during module load, so a disk that is there is already in sysfs; only
    // its /dev node may lag behind. Without a sysfs entry, wait briefly, not the whole time.
    let in_sysfs = dev
        .file_name()
        .is_some_and(|n| Path::new("/sys/class/block").join(n).exists());
    let wait_ms = if in_sysfs { wait_ms } else { wait_ms.min(200) };
    let deadline = crate::sys::monotonic_ms().saturating_add(wait_ms);
    while !dev.exists() && crate::sys::monotonic_ms() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    if dev.exists() {
        match mount(
            Some(dev),
            target,
            Some(fstype),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            None::<&str>,
        ) {
            Ok(()) => {
                log::info(&format!(
                    "mounted persistent disk {device} ({fstype}) on {}",
                    target.display()
                ));
                return true;
            }
            Err(e) => log::error(&format!(
                "mount {device} on {}: {}",
                target.display(),
                e.desc()
            )),
        }
    }
    match mount(
        Some("tmpfs"),
        target,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    ) {
        Ok(()) => log::warn(&format!(
            "no persistent disk ({device} absent or unusable): {} is tmpfs, session state and logs will not survive a reboot",
            target.display()
        )),
        Err(e) => log::error(&format!(
            "mount tmpfs on {}: {}",
            target.display(),
            e.desc()
        )),
    }
    false
}

/// Set the hostname (empty: leave it).
pub fn set_hostname(name: &str) {
    if !name.is_empty()
        && let Err(e) = nix::unistd::sethostname(name)
    {
        log::warn(&format!("sethostname {name}: {}", e.desc()));
    }
}

/// Unmount `target` (the persistent disk), or at least remount it read-only.
pub fn unmount_persistent(target: &Path) {
    crate::sys::sync();
    match umount2(target, MntFlags::empty()) {
        Ok(()) => log::info(&format!("unmounted {}", target.display())),
        Err(e) => {
            log::warn(&format!(
                "umount {}: {}; remounting read-only",
                target.display(),
                e.desc()
            ));
            let flags = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
            if let Err(e) = mount(None::<&str>, target, None::<&str>, flags, None::<&str>) {
                log::error(&format!(
                    "remount {} read-only: {}",
                    target.display(),
                    e.desc()
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_from_proc_mounts() {
        let text = "proc /proc proc rw,nosuid 0 0\nsysfs /sys sysfs rw 0 0\n/dev/vda /var\\040data ext4 rw 0 0\n\ngarbage\n";
        assert_eq!(mount_points(text), vec!["/proc", "/sys", "/var data"]);
    }

    #[test]
    fn api_mount_table_is_ordered_proc_first_cgroup_after_sys() {
        let t = api_mounts();
        assert_eq!(t[0].target, "/proc");
        let sys = t.iter().position(|m| m.target == "/sys").unwrap();
        let cg = t.iter().position(|m| m.target == "/sys/fs/cgroup").unwrap();
        let dev = t.iter().position(|m| m.target == "/dev").unwrap();
        let pts = t.iter().position(|m| m.target == "/dev/pts").unwrap();
        assert!(sys < cg && dev < pts);
    }
}
