//! `jetsync-applier`: the per-instance applier daemon and its operator commands.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
