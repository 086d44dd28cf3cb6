//! `[proxy] max_connections_per_client`: how many connections one client address may hold open
//! at once, checked at accept. A sharded map (no global lock) of address → open connections;
//! the slot a connection holds gives its place back when dropped.

use std::net::IpAddr;
use std::sync::Arc;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

pub struct ClientCap {
    max: usize,
    open: DashMap<IpAddr, usize>,
}

/// The address already holds `max_connections_per_client` connections.
#[derive(Debug)]
pub struct AtCapacity;

/// One open connection of one client address.
pub struct ClientSlot {
    cap: Arc<ClientCap>,
    ip: IpAddr,
}

impl ClientCap {
    /// `max = 0`: no cap.
    pub fn new(max: usize) -> Arc<ClientCap> {
        Arc::new(ClientCap {
            max,
            open: DashMap::new(),
        })
    }

    /// A slot for one more connection from `ip`, `Ok(None)` when there is no cap, `Err` when
    /// the address already holds `max`.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Result<Option<ClientSlot>, AtCapacity> {
        if self.max == 0 {
            return Ok(None);
        }
        let mut n = self.open.entry(ip).or_insert(0);
        if *n >= self.max {
            return Err(AtCapacity);
        }
        *n += 1;
        Ok(Some(ClientSlot {
            cap: self.clone(),
            ip,
        }))
    }

    /// Connections `ip` holds now.
    pub fn open(&self, ip: IpAddr) -> usize {
        self.open.get(&ip).map_or(0, |n| *n)
    }

    /// Addresses holding at least one connection.
    pub fn clients(&self) -> usize {
        self.open.len()
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        // Under the shard's lock: an address that reaches zero leaves the map.
        if let Entry::Occupied(mut e) = self.cap.open.entry(self.ip) {
            if *e.get() <= 1 {
                e.remove();
            } else {
                *e.get_mut() -= 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_each_address_and_gives_slots_back() {
        let cap = ClientCap::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let s1 = cap.acquire(a).unwrap();
        let _s2 = cap.acquire(a).unwrap();
        assert!(cap.acquire(a).is_err());
        let _b1 = cap.acquire(b).unwrap();
        assert_eq!(cap.open(a), 2);
        drop(s1);
        assert_eq!(cap.open(a), 1);
        let _s3 = cap.acquire(a).unwrap();
        assert!(cap.acquire(a).is_err());
        drop(_s3);
        drop(_s2);
        drop(_b1);
        assert_eq!(
            cap.clients(),
            0,
            "addresses with no connection leave the map"
        );
    }

    #[test]
    fn zero_means_no_cap() {
        let cap = ClientCap::new(0);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..1000 {
            assert!(cap.acquire(a).unwrap().is_none());
        }
        assert_eq!(cap.clients(), 0);
    }
}
