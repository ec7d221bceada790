//! tau-standin: stand-in for TauOS service daemons (tau-session, tau-powerd, ...), NOT part of
//! the product. Reports readiness over sd_notify, keeps a heartbeat and start counter in its
//! state dir and injects faults through a control dir, so tau-init can be tested end to end.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

static TERM: AtomicBool = AtomicBool::new(false);
static USR1: AtomicBool = AtomicBool::new(false);

const HELP: &str = "\
tau-standin: test stand-in for TauOS service daemons (not part of the product)

flags:
  --heartbeat-ms N     write $TAU_STATE_DIR/heartbeat every N ms (default 1000)
  --control DIR        fault-injection dir (default /run/standin/<unit>)
  --crash-delay-ms N   delay before dying when `crash-always` exists (default 200)
  --crash-after-ms N   exit after N ms (with --exit-code, default 1)
  --exit-code N        exit code for --crash-after-ms; alone: exit N right after start

control files (checked every heartbeat and on SIGUSR1):
  crash         contents: exit code | abort | segv; deleted, then die that way
  crash-always  same contents; die on every start after --crash-delay-ms (kept)
  hang          ignore SIGTERM from then on
  leak          allocate and touch 1 MiB per heartbeat
  write         its contents go to $TAU_STATE_DIR/data (fsync'd); deleted
";

const FLAGS: [&str; 5] = [
    "--heartbeat-ms",
    "--control",
    "--crash-delay-ms",
    "--crash-after-ms",
    "--exit-code",
];

extern "C" fn on_term(_: libc::c_int) {
    TERM.store(true, Ordering::SeqCst);
}
extern "C" fn on_usr1(_: libc::c_int) {
    USR1.store(true, Ordering::SeqCst);
}

struct Opts {
    heartbeat_ms: u64,
    control: Option<PathBuf>,
    crash_delay_ms: u64,
    crash_after_ms: Option<u64>,
    exit_code: Option<i32>,
}

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        heartbeat_ms: 1000,
        control: None,
        crash_delay_ms: 200,
        crash_after_ms: None,
        exit_code: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "-h" || a == "--help" {
            print!("{HELP}");
            std::process::exit(0);
        }
        if !FLAGS.contains(&a.as_str()) {
            return Err(format!("unknown flag {a}"));
        }
        let v = args.next().ok_or_else(|| format!("{a}: missing value"))?;
        let num = || {
            v.parse::<u64>()
                .map_err(|_| format!("{a}: bad number {v:?}"))
        };
        match a.as_str() {
            "--heartbeat-ms" => o.heartbeat_ms = num()?.max(10),
            "--control" => o.control = Some(PathBuf::from(&v)),
            "--crash-delay-ms" => o.crash_delay_ms = num()?,
            "--crash-after-ms" => o.crash_after_ms = Some(num()?),
            "--exit-code" => {
                o.exit_code = Some(v.parse().map_err(|_| format!("{a}: bad code {v:?}"))?)
            }
            _ => {} // not in FLAGS: rejected above
        }
    }
    Ok(o)
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// Write `data` to `path` atomically and durably: temp file, fsync, rename, fsync dir.
fn write_durable(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

struct Daemon {
    unit: String,
    state: Option<PathBuf>,
    control: PathBuf,
    hang: bool,
    leaked: Vec<Vec<u8>>,
}

impl Daemon {
    fn journal(&self, msg: &str) {
        let Some(dir) = &self.state else { return };
        let res = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("journal"))
            .and_then(|mut f| {
                writeln!(
                    f,
                    "{} {} pid={} {}",
                    now_ms(),
                    self.unit,
                    std::process::id(),
                    msg
                )?;
                f.sync_all()
            });
        if let Err(e) = res {
            eprintln!("standin {}: journal: {e}", self.unit);
        }
    }

    fn bump_starts(&self) -> u64 {
        let Some(dir) = &self.state else { return 0 };
        let path = dir.join("starts");
        let n = fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0)
            + 1;
        if let Err(e) = write_durable(&path, format!("{n}\n").as_bytes()) {
            eprintln!("standin {}: starts: {e}", self.unit);
        }
        n
    }

    fn heartbeat(&mut self) {
        if let Some(dir) = &self.state {
            let _ = fs::write(dir.join("heartbeat"), format!("{}\n", now_ms()));
        }
        if self.control.join("leak").exists() {
            let chunk = vec![0xa5u8; 1 << 20]; // vec! of a non-zero byte touches every page
            self.leaked.push(std::hint::black_box(chunk));
        }
    }

    /// Die the way a control file says: a number is an exit code, `abort`/`segv` a signal.
    fn die(&self, how: &str, why: &str) -> ! {
        let how = how.trim();
        self.journal(&format!(
            "crash {why} how={}",
            if how.is_empty() { "1" } else { how }
        ));
        let _ = std::io::stdout().flush();
        match how {
            "abort" => std::process::abort(),
            "segv" => unsafe {
                libc::signal(libc::SIGSEGV, libc::SIG_DFL);
                libc::raise(libc::SIGSEGV);
                libc::_exit(139)
            },
            "" => std::process::exit(1),
            n => std::process::exit(n.parse().unwrap_or(1)),
        }
    }

    /// Look at the control dir; returns a crash-always deadline if that file exists.
    fn check_control(&mut self) -> Option<String> {
        let c = self.control.clone();
        if let Ok(how) = fs::read_to_string(c.join("crash")) {
            let _ = fs::remove_file(c.join("crash"));
            self.die(&how, "control/crash");
        }
        if !self.hang && c.join("hang").exists() {
            self.hang = true;
            unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
            TERM.store(false, Ordering::SeqCst);
            self.journal("hang: ignoring SIGTERM");
        }
        if let Ok(text) = fs::read(c.join("write")) {
            let _ = fs::remove_file(c.join("write"));
            match &self.state {
                Some(dir) => match write_durable(&dir.join("data"), &text) {
                    Ok(()) => self.journal(&format!("wrote data bytes={}", text.len())),
                    Err(e) => self.journal(&format!("write data failed: {e}")),
                },
                None => eprintln!("standin {}: write: no TAU_STATE_DIR", self.unit),
            }
        }
        fs::read_to_string(c.join("crash-always")).ok()
    }
}

fn notify(msg: &str) {
    let Ok(path) = std::env::var("NOTIFY_SOCKET") else {
        return;
    };
    let res = (|| -> std::io::Result<()> {
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        if let Some(name) = path.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            sock.send_to_addr(msg.as_bytes(), &addr)?;
        } else {
            sock.send_to(msg.as_bytes(), &path)?;
        }
        Ok(())
    })();
    if let Err(e) = res {
        eprintln!("standin: notify {path}: {e}");
    }
}

fn main() {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("tau-standin: {e} (see --help)");
            std::process::exit(2);
        }
    };
    // SAFETY: the handlers only store to atomics, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t);
        libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t);
    }
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let unit = var("TAU_UNIT").unwrap_or_else(|| "standin".into());
    let state = var("TAU_STATE_DIR").map(PathBuf::from);
    let control = opts
        .control
        .clone()
        .unwrap_or_else(|| PathBuf::from("/run/standin").join(&unit));
    let restarts = var("TAU_RESTART_COUNT").unwrap_or_else(|| "0".into());
    let last_exit = var("TAU_LAST_EXIT").unwrap_or_else(|| "none".into());
    let pid = std::process::id();
    // The fault-injection dir exists from the start, so `echo 3 > DIR/crash` just works.
    let _ = std::fs::create_dir_all(&control);
    let mut d = Daemon {
        unit,
        state,
        control,
        hang: false,
        leaked: Vec::new(),
    };

    println!(
        "standin {} started pid={pid} restart_count={restarts} last_exit={last_exit}",
        d.unit
    );
    let _ = std::io::stdout().flush();
    let starts = d.bump_starts();
    d.journal(&format!(
        "start n={starts} restart_count={restarts} last_exit={last_exit}"
    ));
    notify("READY=1\nSTATUS=running");

    if let (Some(code), None) = (opts.exit_code, opts.crash_after_ms) {
        d.journal(&format!("exit code={code}"));
        std::process::exit(code);
    }
    let t0 = Instant::now();
    let crash_after = opts.crash_after_ms.map(|ms| t0 + Duration::from_millis(ms));
    let mut crash_always = d
        .check_control()
        .map(|how| (t0 + Duration::from_millis(opts.crash_delay_ms), how));
    d.heartbeat();
    let mut next_beat = t0 + Duration::from_millis(opts.heartbeat_ms);
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let now = Instant::now();
        if TERM.swap(false, Ordering::SeqCst) && !d.hang {
            notify("STOPPING=1");
            d.journal("stopped");
            println!("standin {} stopped", d.unit);
            std::process::exit(0);
        }
        let usr1 = USR1.swap(false, Ordering::SeqCst);
        if usr1 || now >= next_beat {
            if now >= next_beat {
                d.heartbeat();
                next_beat = now + Duration::from_millis(opts.heartbeat_ms);
            }
            if let Some(how) = d.check_control() {
                crash_always.get_or_insert((now + Duration::from_millis(opts.crash_delay_ms), how));
            }
        }
        if let Some((when, how)) = &crash_always
            && now >= *when
        {
            d.die(how, "control/crash-always");
        }
        if crash_after.is_some_and(|t| now >= t) {
            let code = opts.exit_code.unwrap_or(1);
            d.journal(&format!("crash-after-ms exit={code}"));
            std::process::exit(code);
        }
    }
}
