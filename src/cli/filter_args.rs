//! The event filter flags shared by `replay` and `tail`.

use ctrlbus::{Filter, InstanceId, Pattern};

use super::values;

/// `--type PATTERN… --tenant T --instance ID`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct FilterArgs {
    /// Only events whose type matches PATTERN (`deploy.failed`, `deploy.*`,
    /// `*`); repeat for several.
    #[arg(long = "type", value_name = "PATTERN", value_parser = values::pattern)]
    pub(crate) types: Vec<Pattern>,
    /// Only this tenant's events.
    #[arg(long, value_name = "T")]
    pub(crate) tenant: Option<String>,
    /// Only this instance's events.
    #[arg(long, value_name = "ID", value_parser = values::instance)]
    pub(crate) instance: Option<InstanceId>,
}

impl FilterArgs {
    /// The filter these flags describe.
    pub(crate) fn filter(&self) -> Filter {
        Filter {
            types: self.types.clone(),
            tenant_id: self.tenant.clone(),
            instance_id: self.instance,
        }
    }
}
