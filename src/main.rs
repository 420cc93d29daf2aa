//! `ctrlbus`: publish, replay and audit a ctrlbus log, manage its cursors and
//! webhooks, and run its delivery workers. See `ctrlbus --help`.
#![forbid(unsafe_code)]

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
