//! taucli: the admin's tool for tau-init.

fn main() -> std::process::ExitCode {
    eprintln!("taucli: no commands yet");
    std::process::ExitCode::from(2)
}
