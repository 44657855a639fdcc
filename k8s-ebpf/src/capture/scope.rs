//! Under `--netns all`: the kernel's set of addresses a pod's outbound connection may
//! reach and still be judged (`SCOPE_PEERS`). A pod connecting to anything else on a
//! watched port — another pod's etcd, a database outside the cluster — is out of scope for
//! the verdict; dropping it in the kernel keeps it from costing the node's ring buffer.
//!
//! Userspace owns the set: this node's addresses, the `kubernetes` Service's, the nodes'
//! and the API servers' from the identity cache — exactly what the verdict calls "the node
//! or the control plane". Until the set is filled once (the Kubernetes feeds synced, or
//! the start-up wait ran out, or no API), the kernel passes every such record to
//! userspace, which judges it as before. A set larger than the map leaves the filter off.

use std::{collections::BTreeSet, net::IpAddr};

use aya::maps::{Array, HashMap, MapData};
use k8s_ebpf_common::{setting, SCOPE_PEERS_MAX};

use super::CaptureError;

/// The kernel's key for an address: IPv4 in the first four bytes (as the programs write
/// it after unmapping `::ffff:a.b.c.d`), IPv6 as its sixteen.
pub fn scope_key(ip: IpAddr) -> [u8; 16] {
    let mut key = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => key[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => key[..4].copy_from_slice(&v4.octets()),
            None => key = v6.octets(),
        },
    }
    key
}

/// What [`ScopePeers::replace`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScopeUpdate {
    /// The kernel holds the set and drops pods' outbound records to anything else.
    Filtering { added: usize, removed: usize },
    /// More addresses than the map holds: the filter is off (every pod's outbound record
    /// reaches userspace).
    TooMany(usize),
}

/// The `SCOPE_PEERS` map, what it holds, and whether its filter is on.
pub(super) struct ScopePeers {
    peers: HashMap<MapData, [u8; 16], u8>,
    held: BTreeSet<[u8; 16]>,
    on: bool,
}

impl ScopePeers {
    pub(super) fn new(peers: HashMap<MapData, [u8; 16], u8>) -> Self {
        Self {
            peers,
            held: BTreeSet::new(),
            on: false,
        }
    }

    /// Makes the kernel's set `wanted` and turns the filter on in `settings` (new
    /// addresses are added before old ones go, so no judged address is ever missing
    /// meanwhile).
    pub(super) fn replace(
        &mut self,
        settings: &mut Array<MapData, u32>,
        wanted: impl IntoIterator<Item = IpAddr>,
    ) -> Result<ScopeUpdate, CaptureError> {
        let wanted: BTreeSet<[u8; 16]> = wanted.into_iter().map(scope_key).collect();
        if wanted.len() > SCOPE_PEERS_MAX as usize {
            self.switch(settings, false)?;
            return Ok(ScopeUpdate::TooMany(wanted.len()));
        }
        let map_err = |source| CaptureError::Map {
            map: "SCOPE_PEERS",
            source,
        };
        let added: Vec<[u8; 16]> = wanted.difference(&self.held).copied().collect();
        for key in &added {
            self.peers.insert(key, 1, 0).map_err(map_err)?;
            self.held.insert(*key);
        }
        let removed: Vec<[u8; 16]> = self.held.difference(&wanted).copied().collect();
        for key in &removed {
            // Already gone is what was wanted.
            let _ = self.peers.remove(key);
            self.held.remove(key);
        }
        self.switch(settings, true)?;
        Ok(ScopeUpdate::Filtering {
            added: added.len(),
            removed: removed.len(),
        })
    }

    fn switch(&mut self, settings: &mut Array<MapData, u32>, on: bool) -> Result<(), CaptureError> {
        if self.on != on {
            settings
                .set(setting::POD_OUTBOUND_SCOPE, u32::from(on), 0)
                .map_err(|source| CaptureError::Map {
                    map: "SETTINGS",
                    source,
                })?;
            self.on = on;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::scope_key;

    #[test]
    fn keys_are_what_the_kernel_writes() {
        let v4 = scope_key("192.0.2.1".parse().expect("ip"));
        assert_eq!(v4, [192, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(scope_key("::ffff:192.0.2.1".parse().expect("ip")), v4);
        let v6 = scope_key("2001:db8::1".parse().expect("ip"));
        assert_eq!(v6[..2], [0x20, 0x01]);
        assert_eq!(v6[15], 1);
    }
}
