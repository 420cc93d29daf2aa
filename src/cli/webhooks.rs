//! `ctrlbus webhooks`: registering and administering webhooks. `add` and
//! `rotate-secret` are the only commands that print a secret.

use std::io::Read;
use std::path::{Path, PathBuf};

use ctrlbus::{Bus, Pattern, Webhook, WebhookId, WebhookRegistry, WebhookUpdate};
use jiff::Timestamp;
use serde::Serialize;

use super::error::{CliError, Result};
use super::output::Out;
use super::{open, values};

/// `webhooks` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Register a webhook; prints it with its id and secret (the only time
    /// the secret is shown, besides rotate-secret).
    #[command(after_help = "\
Examples:
  ctrlbus webhooks add --tenant acme --url https://hooks.acme.example/ctrlbus --event 'deploy.*'
  ctrlbus webhooks add --tenant dev --url http://127.0.0.1:9000/hook --allow-private-targets

Deliveries are signed per Standard Webhooks (webhook-id, webhook-timestamp,
webhook-signature headers) with the secret; receivers verify with it.")]
    Add {
        /// The only tenant whose events it receives.
        #[arg(long, value_name = "T")]
        tenant: String,
        /// Where deliveries are `POSTed` (http or https).
        #[arg(long, value_name = "URL")]
        url: String,
        /// Event type pattern; repeat for several (default: every type).
        #[arg(long = "event", value_name = "PATTERN", value_parser = values::pattern)]
        events: Vec<Pattern>,
        /// The signing secret (`whsec_…`; default: a new random one). It
        /// shows in the process list: prefer --secret-file.
        #[arg(long, value_name = "SECRET", conflicts_with = "secret_file")]
        secret: Option<String>,
        /// Read the signing secret from PATH (`-` for standard input), so
        /// that it never appears on a command line.
        #[arg(long, value_name = "PATH")]
        secret_file: Option<PathBuf>,
        /// Allow a loopback, private or link-local target (for development);
        /// `deliver` needs it too.
        #[arg(long)]
        allow_private_targets: bool,
    },
    /// List webhooks (works while another process holds the log).
    #[command(after_help = "Example:\n  ctrlbus webhooks list --tenant acme --format table")]
    List {
        /// Only this tenant's.
        #[arg(long, value_name = "T")]
        tenant: Option<String>,
    },
    /// Show one webhook.
    #[command(after_help = "Example:\n  ctrlbus webhooks show hook_01jddv1r7v0mzg0e3a8m0q0w4h")]
    Show {
        /// The webhook's id (`hook_…`).
        #[arg(value_parser = values::webhook_id)]
        id: WebhookId,
    },
    /// Change a webhook's URL or event patterns.
    #[command(after_help = "\
Examples:
  ctrlbus webhooks update hook_01jddv1r7v0mzg0e3a8m0q0w4h --url https://new.example/hook
  ctrlbus webhooks update hook_01jddv1r7v0mzg0e3a8m0q0w4h --event 'deploy.failed' --event 'health.*'")]
    #[command(group = clap::ArgGroup::new("change").required(true).multiple(true))]
    Update {
        /// The webhook's id.
        #[arg(value_parser = values::webhook_id)]
        id: WebhookId,
        /// A new URL.
        #[arg(long, value_name = "URL", group = "change")]
        url: Option<String>,
        /// New event patterns (replacing the old ones; `*` for every type).
        #[arg(long = "event", value_name = "PATTERN", value_parser = values::pattern, group = "change")]
        events: Vec<Pattern>,
        /// Allow a loopback, private or link-local target.
        #[arg(long)]
        allow_private_targets: bool,
    },
    /// Enable a webhook.
    #[command(after_help = "Example:\n  ctrlbus webhooks enable hook_01jddv1r7v0mzg0e3a8m0q0w4h")]
    Enable {
        /// The webhook's id.
        #[arg(value_parser = values::webhook_id)]
        id: WebhookId,
    },
    /// Disable a webhook: no new deliveries; its pending ones fail.
    #[command(after_help = "Example:\n  ctrlbus webhooks disable hook_01jddv1r7v0mzg0e3a8m0q0w4h")]
    Disable {
        /// The webhook's id.
        #[arg(value_parser = values::webhook_id)]
        id: WebhookId,
    },
    /// Replace a webhook's secret; prints the new one. The old one keeps
    /// signing beside it for 24 hours.
    #[command(
        after_help = "Example:\n  ctrlbus webhooks rotate-secret hook_01jddv1r7v0mzg0e3a8m0q0w4h"
    )]
    RotateSecret {
        /// The webhook's id.
        #[arg(value_parser = values::webhook_id)]
        id: WebhookId,
        /// The new secret (`whsec_…`; default: a new random one). It shows
        /// in the process list: prefer --secret-file.
        #[arg(long, value_name = "SECRET", conflicts_with = "secret_file")]
        secret: Option<String>,
        /// Read the new secret from PATH (`-` for standard input).
        #[arg(long, value_name = "PATH")]
        secret_file: Option<PathBuf>,
    },
    /// Delete a webhook; its pending deliveries fail, records stay for audit.
    #[command(after_help = "Example:\n  ctrlbus webhooks rm hook_01jddv1r7v0mzg0e3a8m0q0w4h")]
    Rm {
        /// The webhook's id.
        #[arg(value_parser = values::webhook_id)]
        id: WebhookId,
    },
    /// Deliver again every matching event appended in a time window (new
    /// deliveries; `deliver` sends them).
    #[command(
        after_help = "Example:\n  ctrlbus webhooks replay hook_01jddv1r7v0mzg0e3a8m0q0w4h --since 2h"
    )]
    Replay {
        /// The webhook's id.
        #[arg(value_parser = values::webhook_id)]
        id: WebhookId,
        /// From the first event appended at or after TIME.
        #[arg(long, value_name = "TIME", value_parser = values::time)]
        since: Timestamp,
        /// Up to the last event appended at or before TIME.
        #[arg(long, value_name = "TIME", value_parser = values::time)]
        until: Option<Timestamp>,
    },
}

const COLUMNS: [(&str, &str); 6] = [
    ("ID", "id"),
    ("TENANT", "tenant_id"),
    ("URL", "url"),
    ("EVENTS", "events"),
    ("ACTIVE", "active"),
    ("UPDATED", "updated_at"),
];

/// A webhook with its secret: what `add` and `rotate-secret` print.
#[derive(Serialize)]
struct WithSecret<'a> {
    #[serde(flatten)]
    webhook: &'a Webhook,
    secret: &'a str,
}

#[derive(Serialize)]
struct Replayed {
    webhook_id: WebhookId,
    deliveries_created: usize,
}

fn patterns(p: Vec<Pattern>) -> Vec<String> {
    p.into_iter().map(|p| p.as_str().to_owned()).collect()
}

/// Runs a `webhooks` subcommand on the file at `db`.
pub(crate) fn run(db: &Path, cmd: Command, out: &mut Out) -> Result {
    match cmd {
        Command::List { tenant } => {
            let log = open::read_only(db)?;
            out.list(&COLUMNS, &log.webhooks(tenant.as_deref())?)?;
        }
        Command::Show { id } => {
            let log = open::read_only(db)?;
            out.record(&log.webhook(id)?)?;
        }
        cmd => {
            let bus = open::writable(db, matches!(cmd, Command::Add { .. }))?;
            let r = run_registry(bus.webhooks(), cmd, out);
            bus.close();
            r?;
        }
    }
    Ok(())
}

/// Runs a `webhooks` subcommand on any registry (`--nats`; the writes on
/// a file).
pub(crate) fn run_registry<R: WebhookRegistry>(hooks: R, cmd: Command, out: &mut Out) -> Result {
    match cmd {
        Command::Add {
            tenant,
            url,
            events,
            secret,
            secret_file,
            allow_private_targets,
        } => {
            let secret = secret_from(secret, secret_file.as_deref())?;
            let created =
                hooks
                    .allow_private_targets(allow_private_targets)
                    .create(ctrlbus::NewWebhook {
                        tenant_id: tenant,
                        url,
                        events: patterns(events),
                        secret,
                    })?;
            out.record(&WithSecret {
                webhook: &created.webhook,
                secret: created.secret.expose(),
            })?;
        }
        Command::List { tenant } => out.list(&COLUMNS, &hooks.list(tenant.as_deref())?)?,
        Command::Show { id } => out.record(&hooks.get(id)?)?,
        Command::Update {
            id,
            url,
            events,
            allow_private_targets,
        } => {
            let update = WebhookUpdate {
                url,
                events: (!events.is_empty()).then(|| patterns(events)),
                active: None,
            };
            let hook = hooks
                .allow_private_targets(allow_private_targets)
                .update(id, update)?;
            out.record(&hook)?;
        }
        Command::Enable { id } | Command::Disable { id } => {
            let active = matches!(cmd, Command::Enable { .. });
            let update = WebhookUpdate {
                active: Some(active),
                ..WebhookUpdate::default()
            };
            out.record(&hooks.update(id, update)?)?;
        }
        Command::RotateSecret {
            id,
            secret,
            secret_file,
        } => {
            let secret = secret_from(secret, secret_file.as_deref())?;
            let rotated = hooks.rotate_secret(id, secret.as_deref())?;
            out.record(&WithSecret {
                webhook: &rotated.webhook,
                secret: rotated.secret.expose(),
            })?;
        }
        Command::Rm { id } => {
            hooks.delete(id)?;
            out.record(&serde_json::json!({ "deleted": id.to_string() }))?;
        }
        Command::Replay { id, since, until } => {
            let ids = hooks.replay(id, since, until)?;
            out.record(&Replayed {
                webhook_id: id,
                deliveries_created: ids.len(),
            })?;
        }
    }
    Ok(())
}

/// Longest secret file read (a `whsec_` secret is about 50 bytes).
const MAX_SECRET_FILE_BYTES: u64 = 4096;

/// The secret given by `--secret`, or read from `--secret-file` (`-` for
/// standard input), surrounding white space (a trailing newline) trimmed.
fn secret_from(secret: Option<String>, file: Option<&Path>) -> Result<Option<String>> {
    let Some(path) = file else {
        return Ok(secret);
    };
    let name = path.display();
    let mut text = String::new();
    let read = if path == Path::new("-") {
        std::io::stdin()
            .take(MAX_SECRET_FILE_BYTES + 1)
            .read_to_string(&mut text)
    } else {
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_SECRET_FILE_BYTES + 1).read_to_string(&mut text))
    };
    read.map_err(|e| CliError::msg(format!("cannot read the secret from {name}: {e}")))?;
    if text.len() as u64 > MAX_SECRET_FILE_BYTES {
        return Err(CliError::msg(format!(
            "{name} is longer than {MAX_SECRET_FILE_BYTES} bytes: not a webhook secret"
        )));
    }
    let text = text.trim();
    if text.is_empty() {
        return Err(CliError::msg(format!("{name} holds no secret")));
    }
    Ok(Some(text.to_owned()))
}
