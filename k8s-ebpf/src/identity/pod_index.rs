//! The identity cache's two pod indexes, by name and by address, each slot one pointer to
//! the pod (plus which of its addresses, for the second): the keys are read from the pod
//! itself, so at 150,000 pods the indexes cost what the pointers cost, not a second copy
//! of every namespace, name and address.

use std::{
    hash::{BuildHasher, RandomState},
    net::IpAddr,
    sync::Arc,
};

use hashbrown::HashTable;

use super::{cache::canonical, PodIdentity};

/// Pods by namespace and name.
#[derive(Debug, Default)]
pub struct PodsByName {
    table: HashTable<Arc<PodIdentity>>,
    hasher: RandomState,
}

impl PodsByName {
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            table: HashTable::with_capacity(capacity),
            hasher: RandomState::new(),
        }
    }

    fn hash(hasher: &RandomState, namespace: &str, name: &str) -> u64 {
        hasher.hash_one((namespace, name))
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<&Arc<PodIdentity>> {
        let hash = Self::hash(&self.hasher, namespace, name);
        self.table
            .find(hash, |p| &*p.namespace == namespace && &*p.name == name)
    }

    pub fn remove(&mut self, namespace: &str, name: &str) -> Option<Arc<PodIdentity>> {
        let hash = Self::hash(&self.hasher, namespace, name);
        self.table
            .find_entry(hash, |p| &*p.namespace == namespace && &*p.name == name)
            .ok()
            .map(|e| e.remove().0)
    }

    /// Adds `pod`, replacing the pod of the same name.
    pub fn insert(&mut self, pod: Arc<PodIdentity>) {
        self.remove(&pod.namespace, &pod.name);
        let hasher = &self.hasher;
        let hash = Self::hash(hasher, &pod.namespace, &pod.name);
        self.table
            .insert_unique(hash, pod, |p| Self::hash(hasher, &p.namespace, &p.name));
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<PodIdentity>> {
        self.table.iter()
    }
}

/// One address of a pod: `pod.ips[index]`.
#[derive(Debug)]
struct AddressOf {
    pod: Arc<PodIdentity>,
    index: u8,
}

impl AddressOf {
    fn ip(&self) -> Option<IpAddr> {
        self.pod
            .ips
            .get(usize::from(self.index))
            .map(|ip| canonical(*ip))
    }
}

/// Pods by address (canonical: IPv4-mapped IPv6 as IPv4).
#[derive(Debug, Default)]
pub struct PodsByIp {
    table: HashTable<AddressOf>,
    hasher: RandomState,
}

impl PodsByIp {
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            table: HashTable::with_capacity(capacity),
            hasher: RandomState::new(),
        }
    }

    pub fn get(&self, ip: &IpAddr) -> Option<&Arc<PodIdentity>> {
        self.table
            .find(self.hasher.hash_one(ip), |a| a.ip() == Some(*ip))
            .map(|a| &a.pod)
    }

    pub fn contains_key(&self, ip: &IpAddr) -> bool {
        self.get(ip).is_some()
    }

    /// Maps `ip`, one of `pod`'s addresses, to `pod` (replacing its holder). An address
    /// the pod does not list (or past the 256th) is not indexed.
    pub fn insert(&mut self, ip: IpAddr, pod: &Arc<PodIdentity>) {
        let Some(index) = pod
            .ips
            .iter()
            .position(|a| canonical(*a) == ip)
            .and_then(|i| u8::try_from(i).ok())
        else {
            return;
        };
        let slot = AddressOf {
            pod: Arc::clone(pod),
            index,
        };
        let hasher = &self.hasher;
        let hash = hasher.hash_one(ip);
        match self.table.find_entry(hash, |a| a.ip() == Some(ip)) {
            Ok(mut held) => *held.get_mut() = slot,
            Err(_) => {
                self.table.insert_unique(hash, slot, |a| {
                    // Every slot's address exists (checked above when it went in).
                    hasher.hash_one(a.ip().unwrap_or(IpAddr::from([0u8; 4])))
                });
            }
        }
    }

    /// Unmaps `ip` if `pod` holds it (a newer pod may have taken it already).
    pub fn remove_if_held_by(&mut self, ip: &IpAddr, pod: &Arc<PodIdentity>) {
        if let Ok(held) = self
            .table
            .find_entry(self.hasher.hash_one(ip), |a| a.ip() == Some(*ip))
        {
            if Arc::ptr_eq(&held.get().pod, pod) {
                held.remove();
            }
        }
    }

    pub fn pods(&self) -> impl Iterator<Item = &Arc<PodIdentity>> {
        self.table.iter().map(|a| &a.pod)
    }
}
