//! `ctrlbus`: publish, replay and audit a ctrlbus log, manage its cursors and
//! webhooks, and run its delivery workers. See `ctrlbus --help`.
#![forbid(unsafe_code)]
// The allowlist, after redb's, each for a reason:
#![allow(
    // Errors are documented per enum variant in error.rs, once.
    clippy::missing_errors_doc,
    clippy::missing_panics_doc,
    // `webhook::WebhookError` reads better than the alternatives.
    clippy::module_name_repetitions,
    // Noise on every getter; the results that matter say so in their docs.
    clippy::must_use_candidate,
    clippy::return_self_not_must_use,
    clippy::needless_pass_by_value,
    clippy::redundant_closure_for_method_calls,
    clippy::similar_names,
    clippy::too_many_lines,
    clippy::unnecessary_wraps,
    clippy::unreadable_literal,
    clippy::if_not_else,
    // Modules split from one file by responsibility see their parent's
    // items with `use super::*`.
    clippy::wildcard_imports,
    // Lengths and counts bounded far below the target's range (frames are
    // capped at 256 MiB, batches and groups too).
    clippy::cast_possible_truncation,
    // Rates and jitter are reported as floats; exactness past 2^52 is moot.
    clippy::cast_precision_loss,
    // Debug impls leave secrets out on purpose.
    clippy::missing_fields_in_debug
)]

mod cli;

/// mimalloc rather than glibc's malloc: events are allocated on the
/// publishing thread and freed on the applier thread, and glibc's arenas
/// make those two contend (BENCHMARKS.md). Library users pick their own.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
