//! Subscriptions kept by the tenant their filter names, so the fan-out
//! finds those that may want an event by one lookup of its tenant however
//! many tenants have subscriptions. Both kinds of durable consumer use it:
//! the pull subscriptions' wakers (`PullWakers`) and the live handlers
//! (`LiveSubs`).
//!
//! Invariants:
//! - An item is in exactly one list: `by_tenant[its tenant]`, or
//!   `any_tenant` when its filter names none.
//! - No list in `by_tenant` is empty (`retain` drops emptied tenants), so
//!   an empty map means no item names a tenant.

use std::collections::HashMap;

/// Items by the tenant their filter names, or none.
#[derive(Clone)]
pub(crate) struct ByTenant<T> {
    by_tenant: HashMap<String, Vec<T>>,
    any_tenant: Vec<T>,
}

impl<T> Default for ByTenant<T> {
    fn default() -> Self {
        ByTenant {
            by_tenant: HashMap::new(),
            any_tenant: Vec::new(),
        }
    }
}

impl<T> ByTenant<T> {
    /// Adds `item`, whose filter names `tenant` (or none).
    pub(crate) fn push(&mut self, tenant: Option<&str>, item: T) {
        match tenant {
            Some(t) => self.by_tenant.entry(t.to_owned()).or_default().push(item),
            None => self.any_tenant.push(item),
        }
    }

    /// Keeps only the items `keep` says to, dropping emptied tenants.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        self.any_tenant.retain(&mut keep);
        self.by_tenant.retain(|_, items| {
            items.retain(&mut keep);
            !items.is_empty()
        });
    }

    /// The items whose filter names `tenant` (`Some`), or names none.
    pub(crate) fn list(&self, tenant: Option<&str>) -> &[T] {
        match tenant {
            // No lookup (a hash of the tenant) when no item names one.
            Some(_) if self.by_tenant.is_empty() => &[],
            Some(t) => self.by_tenant.get(t).map_or(&[], Vec::as_slice),
            None => &self.any_tenant,
        }
    }

    /// As [`ByTenant::list`], to change the items.
    pub(crate) fn list_mut(&mut self, tenant: Option<&str>) -> &mut [T] {
        match tenant {
            Some(_) if self.by_tenant.is_empty() => &mut [],
            Some(t) => self.by_tenant.get_mut(t).map_or(&mut [], Vec::as_mut_slice),
            None => &mut self.any_tenant,
        }
    }

    /// Whether some item's filter names a tenant.
    #[cfg(test)]
    pub(crate) fn has_tenants(&self) -> bool {
        !self.by_tenant.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_are_found_by_their_tenant_and_emptied_tenants_go() {
        let mut items = ByTenant::default();
        items.push(Some("a"), 1);
        items.push(Some("a"), 2);
        items.push(Some("b"), 3);
        items.push(None, 4);
        assert_eq!(items.list(Some("a")), [1, 2]);
        assert_eq!(items.list(Some("b")), [3]);
        assert_eq!(items.list(Some("c")), [] as [i32; 0]);
        assert_eq!(items.list(None), [4]);
        items.list_mut(Some("a"))[0] = 10;
        items.retain(|i| *i != 3 && *i != 4);
        assert_eq!(items.list(Some("a")), [10, 2]);
        assert_eq!(items.list(Some("b")), [] as [i32; 0]);
        assert_eq!(items.list(None), [] as [i32; 0]);
        items.retain(|_| false);
        assert!(!items.has_tenants(), "an emptied tenant is dropped");
    }
}
