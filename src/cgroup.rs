//! cgroup v2 pools: `<root>/tau/<priority>/<unit>`, with the controllers the kernel offers
//! enabled down the tree, a CPU weight per priority pool, and per-unit memory and CPU limits.
//! The root is a parameter, so tests run against a temporary directory.

use std::fs;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use crate::config::model::Priority;

/// Controllers we enable when the kernel offers them.
pub const WANTED: [&str; 5] = ["cpuset", "cpu", "io", "memory", "pids"];

/// `cpu.weight` of each priority pool (1..10000, kernel default 100).
pub fn pool_weight(p: Priority) -> u32 {
    match p {
        Priority::Critical => 1000,
        Priority::High => 400,
        Priority::Normal => 100,
        Priority::Low => 50,
        Priority::Background => 10,
    }
}

/// `cpu.max` text for a percentage of one CPU at a 100 ms period (`max` for none).
pub fn cpu_max(percent: f64) -> String {
    if percent <= 0.0 || !percent.is_finite() {
        "max 100000".to_string()
    } else {
        let quota = ((percent / 100.0) * 100_000.0).round().max(1000.0) as u64;
        format!("{quota} 100000")
    }
}

/// `memory.max` text for a MiB limit (`max` for none).
pub fn memory_max(mb: u64) -> String {
    if mb == 0 {
        "max".to_string()
    } else {
        mb.saturating_mul(1024 * 1024).to_string()
    }
}

/// Controllers listed in a `cgroup.controllers` text that we want, as `+a +b`.
pub fn enable_line(available: &str) -> String {
    let have: Vec<&str> = available.split_whitespace().collect();
    WANTED
        .iter()
        .filter(|c| have.contains(c))
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The tau cgroup tree under one root.
#[derive(Debug, Clone)]
pub struct Cgroups {
    root: PathBuf,
    /// Controllers enabled for unit cgroups.
    pub enabled: Vec<String>,
}

impl Cgroups {
    /// Set up `<root>/tau` and its five pools (with per-pool CPU weights when `pooling`). Fails
    /// when `root` is not a cgroup2 mount (no `cgroup.controllers`); partial failures (a
    /// controller refused) are returned as warnings.
    pub fn setup(root: &Path, max_pids: u64, pooling: bool) -> Result<(Self, Vec<String>), String> {
        let mut warnings = Vec::new();
        let controllers = root.join("cgroup.controllers");
        let avail = fs::read_to_string(&controllers)
            .map_err(|e| format!("{}: {e}", controllers.display()))?;
        let line = enable_line(&avail);
        let tau = root.join("tau");
        mkdir(&tau)?;
        let mut enable = |dir: &Path| {
            if !line.is_empty()
                && let Err(e) = fs::write(dir.join("cgroup.subtree_control"), &line)
            {
                warnings.push(format!(
                    "{}: enable {line}: {e}",
                    dir.join("cgroup.subtree_control").display()
                ));
            }
        };
        enable(root);
        enable(&tau);
        for p in Priority::ALL {
            let pool = tau.join(p.as_str());
            mkdir(&pool)?;
            enable(&pool);
        }
        let enabled: Vec<String> = fs::read_to_string(tau.join("cgroup.subtree_control"))
            .unwrap_or_default()
            .split_whitespace()
            .map(|c| c.trim_start_matches('+').to_string())
            .collect();
        let me = Self {
            root: root.to_path_buf(),
            enabled,
        };
        if me.has("cpu") {
            for p in Priority::ALL {
                let w = if pooling { pool_weight(p) } else { 100 };
                me.write(&me.pool(p), "cpu.weight", &w.to_string(), &mut warnings);
            }
        }
        if me.has("pids") && max_pids > 0 {
            me.write(&tau, "pids.max", &max_pids.to_string(), &mut warnings);
        }
        Ok((me, warnings))
    }

    fn has(&self, c: &str) -> bool {
        self.enabled.iter().any(|e| e == c)
    }

    fn write(&self, dir: &Path, file: &str, value: &str, warnings: &mut Vec<String>) {
        if let Err(e) = fs::write(dir.join(file), value) {
            warnings.push(format!(
                "{}: write {value:?}: {e}",
                dir.join(file).display()
            ));
        }
    }

    /// The pool directory of a priority.
    pub fn pool(&self, p: Priority) -> PathBuf {
        self.root.join("tau").join(p.as_str())
    }

    /// The cgroup directory of a unit.
    pub fn unit_dir(&self, p: Priority, unit: &str) -> PathBuf {
        self.pool(p).join(unit)
    }

    /// Create (or reuse) a unit's cgroup, apply its limits, and open its `cgroup.procs` for the
    /// child to join. Limits that fail are returned as warnings.
    pub fn prepare_unit(
        &self,
        p: Priority,
        unit: &str,
        memory_mb: u64,
        cpu_percent: f64,
    ) -> Result<(OwnedFd, Vec<String>), String> {
        let dir = self.unit_dir(p, unit);
        mkdir(&dir)?;
        let mut warnings = Vec::new();
        if self.has("memory") {
            self.write(&dir, "memory.max", &memory_max(memory_mb), &mut warnings);
        }
        if self.has("cpu") {
            self.write(&dir, "cpu.max", &cpu_max(cpu_percent), &mut warnings);
        }
        let procs = dir.join("cgroup.procs");
        let f = fs::OpenOptions::new()
            .write(true)
            .open(&procs)
            .map_err(|e| format!("{}: {e}", procs.display()))?;
        Ok((OwnedFd::from(f), warnings))
    }

    /// Kill every process in a unit's cgroup (`cgroup.kill`, Linux 5.14+). Returns false when
    /// the cgroup or the file is missing.
    pub fn kill_unit(&self, p: Priority, unit: &str) -> bool {
        fs::write(self.unit_dir(p, unit).join("cgroup.kill"), "1").is_ok()
    }

    /// Pids in a unit's cgroup.
    pub fn unit_pids(&self, p: Priority, unit: &str) -> Vec<i32> {
        fs::read_to_string(self.unit_dir(p, unit).join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

fn mkdir(dir: &Path) -> Result<(), String> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("mkdir {}: {e}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_render_as_the_kernel_expects() {
        assert_eq!(cpu_max(50.0), "50000 100000");
        assert_eq!(cpu_max(0.0), "max 100000");
        assert_eq!(cpu_max(0.1), "1000 100000");
        assert_eq!(cpu_max(250.0), "250000 100000");
        assert_eq!(memory_max(2048), "2147483648");
        assert_eq!(memory_max(0), "max");
    }

    #[test]
    fn only_offered_controllers_are_enabled() {
        assert_eq!(
            enable_line("cpuset cpu io memory hugetlb pids rdma misc"),
            "+cpuset +cpu +io +memory +pids"
        );
        assert_eq!(enable_line("memory pids"), "+memory +pids");
        assert_eq!(enable_line(""), "");
    }

    #[test]
    fn setup_builds_pools_in_a_fake_root() {
        let root = std::env::temp_dir().join(format!("tau-cg-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        fs::write(root.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        // A plain directory does not create kernel files: subtree_control reads back empty.
        let (cg, _warnings) = Cgroups::setup(&root, 1600, true).unwrap();
        for p in Priority::ALL {
            assert!(cg.pool(p).is_dir(), "{p:?}");
        }
        assert_eq!(
            fs::read_to_string(root.join("cgroup.subtree_control")).unwrap(),
            "+cpu +memory +pids"
        );
        let (_fd, _w) = cg
            .prepare_unit(Priority::High, "svc", 64, 25.0)
            .unwrap_or_else(|e| {
                // cgroup.procs does not exist in a fake tree until created: create and retry.
                assert!(e.contains("cgroup.procs"), "{e}");
                fs::write(cg.unit_dir(Priority::High, "svc").join("cgroup.procs"), "").unwrap();
                cg.prepare_unit(Priority::High, "svc", 64, 25.0).unwrap()
            });
        assert!(cg.unit_dir(Priority::High, "svc").is_dir());
        assert_eq!(
            fs::read_to_string(cg.pool(Priority::Critical).join("cpu.weight")).unwrap(),
            "1000"
        );
        assert_eq!(
            fs::read_to_string(cg.pool(Priority::Background).join("cpu.weight")).unwrap(),
            "10"
        );
        assert_eq!(
            fs::read_to_string(root.join("tau/pids.max")).unwrap(),
            "1600"
        );
        let unit = cg.unit_dir(Priority::High, "svc");
        assert_eq!(
            fs::read_to_string(unit.join("memory.max")).unwrap(),
            "67108864"
        );
        assert_eq!(
            fs::read_to_string(unit.join("cpu.max")).unwrap(),
            "25000 100000"
        );
        // Without pooling every pool keeps the kernel's default weight.
        let (cg, _) = Cgroups::setup(&root, 0, false).unwrap();
        assert_eq!(
            fs::read_to_string(cg.pool(Priority::Critical).join("cpu.weight")).unwrap(),
            "100"
        );
        fs::remove_dir_all(&root).unwrap();
        assert!(Cgroups::setup(Path::new("/nonexistent-cg"), 0, true).is_err());
    }
}
