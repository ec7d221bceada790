//! taucli: the admin's tool for tau-init, over the control FIFO.
//!
//! Exit codes: 0 ok, 1 command failed, 2 usage, 3 tau-init unreachable.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use serde_json::{Value, json};
use tau_init::control::client::{CallError, call};

#[derive(Parser, Debug)]
#[command(name = "taucli", version, about = "Control and inspect tau-init")]
struct Cli {
    /// tau-init's runtime directory (also TAU_RUN_DIR).
    #[arg(
        long = "run-dir",
        env = "TAU_RUN_DIR",
        default_value = "/run/tau",
        global = true
    )]
    run_dir: PathBuf,
    /// Print JSON for scripts instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// How long to wait for tau-init's reply, in milliseconds.
    #[arg(long, default_value_t = 5000, global = true)]
    timeout: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// System health score and recommendations.
    Health,
    /// Resource usage.
    Resources {
        #[arg(long)]
        cpu: bool,
        #[arg(long)]
        memory: bool,
        #[arg(long)]
        disk: bool,
        #[arg(long)]
        network: bool,
        #[arg(long)]
        thermal: bool,
        #[arg(long)]
        history: bool,
    },
    /// Main processes of the units.
    Processes {
        /// Only critical units.
        #[arg(long)]
        critical: bool,
    },
    /// Recovery state of each unit.
    Recovery {
        /// Include the crash history.
        #[arg(long)]
        history: bool,
    },
    /// tau-init's recent log records.
    Logs {
        /// Counts per level instead of records.
        #[arg(long)]
        stats: bool,
        /// The newest N records (default 20).
        #[arg(long, num_args = 0..=1, default_missing_value = "20")]
        recent: Option<u64>,
        /// Only records about this unit.
        #[arg(long)]
        unit: Option<String>,
        /// Keep printing new records until interrupted.
        #[arg(long)]
        follow: bool,
    },
    /// The effective config, with where each value came from.
    Config,
    /// State of all units, or one.
    Status { unit: Option<String> },
    /// Start a unit.
    Start { unit: String },
    /// Stop a unit (and the units that require it).
    Stop { unit: String },
    /// Restart a unit (not counted as a failure).
    Restart { unit: String },
    /// Re-read the units directory: add, remove and change units; unchanged ones keep running.
    Reload,
    /// Switch to safe mode.
    SafeMode,
    /// Stop everything in order and power off.
    Poweroff,
    /// Stop everything in order and reboot.
    Reboot,
    /// Re-execute tau-init (live upgrade), keeping every running unit.
    Reexec,
    /// Print a shell completion script.
    Completions { shell: clap_complete::Shell },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let mut flags = BTreeMap::new();
    let mut args = Vec::new();
    let name = match &cli.cmd {
        Cmd::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "taucli",
                &mut std::io::stdout(),
            );
            return ExitCode::SUCCESS;
        }
        Cmd::Health => "health",
        Cmd::Resources {
            cpu,
            memory,
            disk,
            network,
            thermal,
            history,
        } => {
            for (k, v) in [
                ("cpu", cpu),
                ("memory", memory),
                ("disk", disk),
                ("network", network),
                ("thermal", thermal),
                ("history", history),
            ] {
                if *v {
                    flags.insert(k.to_string(), json!(true));
                }
            }
            "resources"
        }
        Cmd::Processes { critical } => {
            flags.insert("critical".into(), json!(critical));
            "processes"
        }
        Cmd::Recovery { history } => {
            flags.insert("history".into(), json!(history));
            "recovery"
        }
        Cmd::Logs {
            stats,
            recent,
            unit,
            follow: _,
        } => {
            flags.insert("stats".into(), json!(stats));
            if let Some(n) = recent {
                flags.insert("recent".into(), json!(n));
            }
            if let Some(u) = unit {
                flags.insert("unit".into(), json!(u));
            }
            "logs"
        }
        Cmd::Config => "config",
        Cmd::Status { unit } => {
            args.extend(unit.clone());
            "status"
        }
        Cmd::Start { unit } | Cmd::Stop { unit } | Cmd::Restart { unit } => {
            args.push(unit.clone());
            match &cli.cmd {
                Cmd::Start { .. } => "start",
                Cmd::Stop { .. } => "stop",
                _ => "restart",
            }
        }
        Cmd::Reload => "reload",
        Cmd::SafeMode => "safe-mode",
        Cmd::Poweroff => "poweroff",
        Cmd::Reboot => "reboot",
        Cmd::Reexec => "reexec",
    };
    if let Cmd::Logs {
        follow: true,
        stats: false,
        ..
    } = &cli.cmd
    {
        return follow(&cli, flags);
    }
    match call(&cli.run_dir, name, args, flags, cli.timeout) {
        Ok(reply) if reply.ok => {
            let data = reply.data.unwrap_or(Value::Null);
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&data).unwrap_or_default()
                );
            } else {
                print!("{}", render(name, &data));
            }
            ExitCode::SUCCESS
        }
        Ok(reply) => {
            let msg = reply.error.unwrap_or_else(|| "failed".into());
            if cli.json {
                println!("{}", json!({ "error": msg }));
            }
            eprintln!("taucli: {name}: {msg}");
            ExitCode::from(1)
        }
        Err(e) => fail(e),
    }
}

fn fail(e: CallError) -> ExitCode {
    eprintln!("taucli: {e}");
    match e {
        CallError::Unreachable(_) => ExitCode::from(3),
        CallError::Failed(_) => ExitCode::from(1),
    }
}

/// `logs --follow`: poll for records newer than the last one seen.
fn follow(cli: &Cli, mut flags: BTreeMap<String, Value>) -> ExitCode {
    let mut since = 0u64;
    flags.insert(
        "recent".into(),
        json!(flags.get("recent").and_then(Value::as_u64).unwrap_or(20)),
    );
    loop {
        flags.insert("since".into(), json!(since));
        match call(&cli.run_dir, "logs", vec![], flags.clone(), cli.timeout) {
            Ok(r) if r.ok => {
                let data = r.data.unwrap_or(Value::Null);
                if let Some(recs) = data["records"].as_array() {
                    for rec in recs {
                        if cli.json {
                            println!("{rec}");
                        } else {
                            print!("{}", render_record(rec));
                        }
                    }
                }
                since = data["last_seq"].as_u64().unwrap_or(since);
                flags.insert("recent".into(), json!(1000));
            }
            Ok(r) => {
                eprintln!("taucli: logs: {}", r.error.unwrap_or_default());
                return ExitCode::from(1);
            }
            Err(e) => return fail(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(x) => x.clone(),
        other => other.to_string(),
    }
}

/// Left-aligned columns, two spaces apart.
fn table(head: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| -> String {
        let mut out: String = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect::<Vec<_>>()
            .join("  ");
        out.truncate(out.trim_end().len());
        out + "\n"
    };
    let mut out = line(head.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out += &line(r);
    }
    out
}

fn render_record(r: &Value) -> String {
    let t = r["time_ms"].as_u64().unwrap_or(0);
    format!(
        "{}.{:03}  {:<5}  {}\n",
        t / 1000,
        t % 1000,
        s(&r["level"]),
        s(&r["message"])
    )
}

fn render(cmd: &str, d: &Value) -> String {
    match cmd {
        "status" => {
            let rows = d["units"]
                .as_array()
                .map(|u| {
                    u.iter()
                        .map(|u| {
                            let mut state = s(&u["state"]);
                            if let Some(ms) = u["restart_in_ms"].as_u64() {
                                state += &format!(" ({ms} ms)");
                            }
                            vec![
                                s(&u["name"]),
                                state,
                                s(&u["pid"]),
                                s(&u["priority"]),
                                if u["critical"] == json!(true) {
                                    "yes".into()
                                } else {
                                    "no".into()
                                },
                                s(&u["restarts"]),
                                s(&u["last_exit"]),
                                s(&u["reason"]),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            format!(
                "mode: {}\n{}",
                s(&d["mode"]),
                table(
                    &[
                        "UNIT",
                        "STATE",
                        "PID",
                        "PRIORITY",
                        "CRITICAL",
                        "RESTARTS",
                        "LAST-EXIT",
                        "REASON"
                    ],
                    rows
                )
            )
        }
        "processes" => {
            let rows = d["processes"]
                .as_array()
                .map(|p| {
                    p.iter()
                        .map(|p| {
                            vec![
                                s(&p["pid"]),
                                s(&p["unit"]),
                                s(&p["state"]),
                                s(&p["priority"]),
                                s(&p["rss_kb"]),
                                format!("{}s", p["uptime_ms"].as_u64().unwrap_or(0) / 1000),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            table(
                &["PID", "UNIT", "STATE", "PRIORITY", "RSS-KB", "UPTIME"],
                rows,
            )
        }
        "recovery" => {
            let rows = d["units"]
                .as_array()
                .map(|u| {
                    u.iter()
                        .map(|u| {
                            vec![
                                s(&u["name"]),
                                s(&u["strategy"]),
                                format!("{}/{}", s(&u["attempts"]), s(&u["max_attempts"])),
                                s(&u["restarts"]),
                                s(&u["last_exit"]),
                                s(&u["state"]),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            let mut out = format!("mode: {}\n", s(&d["mode"]));
            out += &table(
                &[
                    "UNIT",
                    "STRATEGY",
                    "ATTEMPTS",
                    "RESTARTS",
                    "LAST-EXIT",
                    "STATE",
                ],
                rows,
            );
            if let Some(h) = d["history"].as_array() {
                let rows = h
                    .iter()
                    .map(|c| {
                        vec![
                            s(&c["time_ms"]),
                            s(&c["unit"]),
                            exit_str(&c["exit"]),
                            format!("{} ms", s(&c["uptime_ms"])),
                            s(&c["attempt"]),
                            s(&c["action"]),
                        ]
                    })
                    .collect();
                out += "\ncrash history:\n";
                out += &table(
                    &["TIME-MS", "UNIT", "EXIT", "UPTIME", "ATTEMPT", "ACTION"],
                    rows,
                );
            }
            out
        }
        "logs" => {
            if let Some(st) = d.get("stats") {
                let rows = [
                    "error",
                    "warn",
                    "info",
                    "debug",
                    "kept",
                    "dropped",
                    "capacity",
                    "last_seq",
                    "console_dropped",
                ]
                .iter()
                .map(|k| vec![k.to_string(), s(&st[*k])])
                .collect();
                return table(&["FIELD", "VALUE"], rows);
            }
            d["records"]
                .as_array()
                .map(|r| r.iter().map(render_record).collect())
                .unwrap_or_default()
        }
        "config" => {
            let rows = d["values"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| vec![k.clone(), s(&v["value"]), s(&v["source"])])
                        .collect()
                })
                .unwrap_or_default();
            format!(
                "file: {}\n{}",
                s(&d["file"]),
                table(&["KEY", "VALUE", "SOURCE"], rows)
            )
        }
        "reload" => {
            let list = |k: &str| {
                d[k].as_array()
                    .map(|a| a.iter().map(s).collect::<Vec<_>>().join(" "))
                    .unwrap_or_default()
            };
            format!(
                "added: {}\nchanged: {}\nremoved: {}\nunchanged: {}\n",
                list("added"),
                list("changed"),
                list("removed"),
                list("unchanged")
            )
        }
        _ => match d {
            Value::Object(m) => m.iter().map(|(k, v)| format!("{k}: {}\n", s(v))).collect(),
            other => format!("{}\n", s(other)),
        },
    }
}

fn exit_str(e: &Value) -> String {
    match e["kind"].as_str() {
        Some("exited") => format!("exit:{}", s(&e["code"])),
        Some("signaled") => format!("signal:{}", s(&e["signal"])),
        Some(k) => k.to_string(),
        None => "-".into(),
    }
}
