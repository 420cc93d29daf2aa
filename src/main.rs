//! `ctrlbus`: publish, replay and audit a ctrlbus log, manage its cursors and
//! webhooks, and run its delivery workers. See `ctrlbus --help`.
#![forbid(unsafe_code)]

mod cli;

/// mimalloc rather than glibc's malloc: events are allocated on the
/// publishing thread and freed on the applier thread, and glibc's arenas
/// make those two contend (BENCHMARKS.md). Library users pick their own.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
