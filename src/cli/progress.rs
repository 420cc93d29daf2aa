//! Progress bars for long work, on standard error and only when it is a
//! terminal: redirected or piped runs print nothing extra.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// True when progress may be drawn.
pub(crate) fn enabled() -> bool {
    std::io::stderr().is_terminal()
}

/// A bar counting `len` units of `what` (hidden unless `enabled()`).
pub(crate) fn bar(len: u64, what: &str) -> ProgressBar {
    if !enabled() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    let style = ProgressStyle::with_template(
        "{prefix} [{bar:40}] {human_pos}/{human_len} {per_sec} eta {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    pb.set_style(style);
    pb.set_prefix(what.to_owned());
    pb
}

/// A spinner for work of unknown length (hidden unless `enabled()`).
pub(crate) fn spinner(what: &str) -> ProgressBar {
    if !enabled() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new_spinner();
    pb.set_message(what.to_owned());
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}
