//! The memory bodies held for inspection may take: all of them together (`[inspect]
//! max_buffered`), and any one client address (an eighth of that, at least `max_body`), so a
//! single client cannot fill the budget and have everyone else's inspected requests refused.

use std::net::IpAddr;
use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct InspectBudget {
    all: Arc<Semaphore>,
    /// Per client address, present only while that client holds bytes.
    clients: Arc<DashMap<IpAddr, Arc<Semaphore>>>,
    share: usize,
}

/// Bytes one request holds, given back when dropped.
pub struct Held {
    all: OwnedSemaphorePermit,
    mine: Option<OwnedSemaphorePermit>,
    client: IpAddr,
    clients: Arc<DashMap<IpAddr, Arc<Semaphore>>>,
}

impl InspectBudget {
    pub fn new(max_buffered: usize, max_body: usize) -> InspectBudget {
        InspectBudget {
            all: Arc::new(Semaphore::new(max_buffered)),
            clients: Arc::new(DashMap::new()),
            share: (max_buffered / 8).max(max_body),
        }
    }

    /// Takes `n` more bytes for `client`, into `held`; `false` when either budget is spent.
    pub fn take(&self, client: IpAddr, n: usize, held: &mut Option<Held>) -> bool {
        let Ok(n32) = u32::try_from(n) else {
            return false;
        };
        let share = self
            .clients
            .entry(client)
            .or_insert_with(|| Arc::new(Semaphore::new(self.share)))
            .clone();
        let taken = match (
            share.clone().try_acquire_many_owned(n32),
            self.all.clone().try_acquire_many_owned(n32),
        ) {
            (Ok(mine), Ok(all)) => Some((mine, all)),
            // A permit taken from only one of the two is given back here.
            _ => None,
        };
        drop(share);
        let Some((mine, all)) = taken else {
            // An entry made for nothing is not kept.
            self.clients
                .remove_if(&client, |_, s| Arc::strong_count(s) == 1);
            return false;
        };
        match held {
            Some(h) => {
                h.all.merge(all);
                if let Some(m) = &mut h.mine {
                    m.merge(mine);
                }
            }
            None => {
                *held = Some(Held {
                    all,
                    mine: Some(mine),
                    client,
                    clients: self.clients.clone(),
                })
            }
        }
        true
    }

    /// Client addresses holding bytes now.
    #[cfg(test)]
    fn clients_holding(&self) -> usize {
        self.clients.len()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        drop(self.mine.take());
        // Only the map still refers to it: this client holds nothing, forget it.
        self.clients
            .remove_if(&self.client, |_, s| Arc::strong_count(s) == 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_client_gets_a_share_others_the_rest() {
        let b = InspectBudget::new(800, 50);
        let (a, c): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let mut held_a = Vec::new();
        for _ in 0..2 {
            let mut h = None;
            assert!(b.take(a, 50, &mut h));
            held_a.push(h);
        }
        // 100 of a's share of 100 are held: a gets no more, c still does.
        let mut more = None;
        assert!(!b.take(a, 1, &mut more));
        let mut h_c = None;
        assert!(b.take(c, 100, &mut h_c));
        assert_eq!(b.clients_holding(), 2);
        drop(held_a);
        drop(h_c);
        assert_eq!(b.clients_holding(), 0, "entries go with the bytes");
        assert_eq!(b.all.available_permits(), 800);
    }

    #[test]
    fn the_total_holds_across_clients() {
        let b = InspectBudget::new(200, 100);
        let mut held = Vec::new();
        for i in 0..2u8 {
            let mut h = None;
            assert!(b.take(IpAddr::from([10, 0, 0, i]), 100, &mut h));
            held.push(h);
        }
        let mut h = None;
        assert!(!b.take("10.0.0.9".parse().unwrap(), 1, &mut h));
        assert_eq!(b.clients_holding(), 2, "a refused client leaves no entry");
    }
}
