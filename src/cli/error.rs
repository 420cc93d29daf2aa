//! How the command line fails: one error type, its exit code, and how it is
//! printed (once, as `ctrlbus: …`).

use std::fmt;
use std::io;

/// Exit code for a runtime error.
pub(crate) const EXIT_RUNTIME: u8 = 1;
/// Exit code for a usage error (bad flags or flag values).
pub(crate) const EXIT_USAGE: u8 = 2;

/// Why a command failed.
#[derive(Debug)]
pub(crate) enum CliError {
    /// The command line itself is wrong (exit 2).
    Usage(String),
    /// The command ran and failed (exit 1).
    Runtime(String),
    /// Standard output was closed under us (`ctrlbus replay | head`): stop
    /// quietly and exit 0.
    BrokenPipe,
}

impl CliError {
    /// A runtime error with a message.
    pub(crate) fn msg(m: impl fmt::Display) -> CliError {
        CliError::Runtime(m.to_string())
    }

    /// The process exit code for this error.
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => EXIT_USAGE,
            CliError::Runtime(_) => EXIT_RUNTIME,
            CliError::BrokenPipe => 0,
        }
    }
}

impl From<io::Error> for CliError {
    fn from(e: io::Error) -> CliError {
        if e.kind() == io::ErrorKind::BrokenPipe {
            CliError::BrokenPipe
        } else {
            CliError::Runtime(e.to_string())
        }
    }
}

/// Every library error converts by its message, which already says what
/// went wrong and what it means for the log.
macro_rules! runtime_from {
    ($($t:ty),* $(,)?) => {$(
        impl From<$t> for CliError {
            fn from(e: $t) -> CliError {
                CliError::Runtime(e.to_string())
            }
        }
    )*};
}

runtime_from!(
    ctrlbus::OpenError,
    ctrlbus::ReadError,
    ctrlbus::StorageError,
    ctrlbus::CursorError,
    ctrlbus::PublishError,
    ctrlbus::SubscribeError,
    ctrlbus::WebhookError,
    ctrlbus::DeliveryError,
);

/// The result of a command.
pub(crate) type Result<T = (), E = CliError> = std::result::Result<T, E>;

/// Turns a clap usage error into one line: its message without the usage
/// block and the help hint.
pub(crate) fn one_line_usage(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let mut parts = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with("Usage:") || line.starts_with("For more information") {
            break;
        }
        if !line.is_empty() {
            parts.push(line.strip_prefix("error: ").unwrap_or(line));
        }
    }
    parts.join(" ")
}
