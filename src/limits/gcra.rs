//! GCRA arithmetic, shared by the memory store and mirrored by the Redis Lua script.
//!
//! A key's state is its theoretical arrival time (TAT). With emission interval `T` per unit of
//! cost and tolerance `τ` (= burst · T), a request of cost `c` at time `now` computes
//! `new = max(TAT, now) + c·T` and passes iff `new − now ≤ τ`. A key whose TAT is in the past
//! is indistinguishable from a fresh key, which is what makes idle eviction and TTLs safe.

use super::LimitKind;

/// What a call does with the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// Rate: charge only if the result is within tolerance (check and charge are one step).
    Reserve,
    /// Bytes after the fact: always charge (the bytes were delivered); deny once overdrawn.
    Charge,
    /// Bytes before a request: charge nothing; deny while no budget is left.
    Peek,
}

impl Op {
    /// The mode letter the Redis script understands.
    pub(crate) fn code(self) -> &'static str {
        match self {
            Op::Reserve => "r",
            Op::Charge => "c",
            Op::Peek => "p",
        }
    }
}

/// A rate or byte limit reduced to GCRA parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    per_ns: u64,
    /// Requests or bytes per period (at least 1).
    amount: u64,
    /// Units allowed at once (at least 1).
    burst: u64,
    /// Rate keeps an integral interval per request so `burst` requests fit exactly;
    /// Bytes computes cost·per/amount in one step so small per-byte intervals keep precision.
    per_request: bool,
}

impl Gcra {
    pub fn from_kind(kind: &LimitKind) -> Option<Gcra> {
        // u64 nanoseconds cover 584 years: longer periods saturate (config rejects them).
        let ns = |per: std::time::Duration| u64::try_from(per.as_nanos()).unwrap_or(u64::MAX);
        match *kind {
            LimitKind::Rate {
                requests,
                per,
                burst,
            } => Some(Gcra {
                per_ns: ns(per),
                amount: requests.max(1),
                burst: burst.max(1),
                per_request: true,
            }),
            LimitKind::Bytes { bytes, per } => Some(Gcra {
                per_ns: ns(per),
                amount: bytes.max(1),
                burst: bytes.max(1),
                per_request: false,
            }),
            LimitKind::Concurrent { .. } => None,
        }
    }

    /// (increment for `cost`, tolerance), both in units of `unit_ns` nanoseconds.
    /// Plain u64 arithmetic on the hot path (u128 division is a slow library call); u128
    /// only when a product would overflow.
    pub fn params(&self, cost: u64, unit_ns: u64) -> (u64, u64) {
        let per = self.per_ns / unit_ns.max(1);
        if self.per_request {
            // Integral interval (at least one unit): `burst` requests of cost 1 then sum to
            // exactly the tolerance, so the count is exact whatever the rounding.
            let t = (per / self.amount).max(1);
            (cost.saturating_mul(t), self.burst.saturating_mul(t))
        } else {
            let inc = match cost.checked_mul(per) {
                Some(p) => p / self.amount,
                None => sat(u128::from(cost) * u128::from(per) / u128::from(self.amount)),
            };
            (inc, per.max(1))
        }
    }
}

fn sat(v: u128) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

/// The outcome of one GCRA step: the TAT to store (if it changes) and, when denied, how long
/// (in the same units) until a request of that cost would pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Step {
    pub store: Option<u64>,
    pub wait: Option<u64>,
}

/// One GCRA step on a TAT (`None` for a key with no state).
pub(crate) fn step(tat: Option<u64>, now: u64, inc: u64, tol: u64, op: Op) -> Step {
    let base = tat.unwrap_or(now).max(now);
    let new = base.saturating_add(inc);
    let ahead = new - now;
    match op {
        Op::Reserve if ahead <= tol => Step {
            store: Some(new),
            wait: None,
        },
        Op::Reserve => Step {
            store: None,
            // A cost above the burst can never pass; tell the client to come back after a
            // full burst window rather than a misleading short wait.
            wait: Some(if inc > tol { tol } else { ahead - tol }),
        },
        Op::Charge => Step {
            store: Some(new),
            wait: (ahead > tol).then(|| ahead - tol),
        },
        Op::Peek => {
            let used = base - now;
            Step {
                store: None,
                wait: (used >= tol).then(|| used - tol + 1),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn rate(requests: u64, per_ms: u64, burst: u64) -> Gcra {
        Gcra::from_kind(&LimitKind::Rate {
            requests,
            per: Duration::from_millis(per_ms),
            burst,
        })
        .unwrap()
    }

    /// Runs `n` reserves of cost 1 at time `now` and counts passes.
    fn passes(g: &Gcra, n: usize, unit: u64) -> usize {
        let (inc, tol) = g.params(1, unit);
        let mut tat = None;
        let mut ok = 0;
        for _ in 0..n {
            let s = step(tat, 1_000, inc, tol, Op::Reserve);
            if s.wait.is_none() {
                ok += 1;
                tat = s.store;
            }
        }
        ok
    }

    #[test]
    fn burst_is_exact_for_awkward_divisions() {
        for (r, per, b) in [
            (3, 1000, 3),
            (50, 60_000, 50),
            (7, 1000, 2),
            (1000, 1, 1000),
        ] {
            for unit in [1, 1000] {
                assert_eq!(
                    passes(&rate(r, per, b), 10_000, unit),
                    b as usize,
                    "{r}/{per}ms b{b} u{unit}"
                );
            }
        }
    }

    #[test]
    fn denied_wait_is_time_until_one_more_fits() {
        let g = rate(5, 1000, 5); // one request per 200 ms
        let (inc, tol) = g.params(1, 1);
        let mut tat = None;
        for _ in 0..5 {
            tat = step(tat, 0, inc, tol, Op::Reserve).store;
        }
        let s = step(tat, 0, inc, tol, Op::Reserve);
        assert_eq!(s.wait, Some(200_000_000));
        // After that wait it passes again.
        assert_eq!(step(tat, 200_000_000, inc, tol, Op::Reserve).wait, None);
    }

    #[test]
    fn huge_byte_costs_do_not_overflow() {
        let g = Gcra::from_kind(&LimitKind::Bytes {
            bytes: 1 << 40,
            per: Duration::from_secs(30 * 86_400),
        })
        .unwrap();
        let (inc, tol) = g.params(1 << 41, 1);
        assert_eq!(inc, 2 * 30 * 86_400 * 1_000_000_000);
        assert_eq!(tol, 30 * 86_400 * 1_000_000_000);
    }

    #[test]
    fn cost_above_burst_never_passes() {
        let g = rate(5, 1000, 5);
        let (inc, tol) = g.params(6, 1);
        assert_eq!(step(None, 0, inc, tol, Op::Reserve).wait, Some(tol));
    }

    #[test]
    fn bytes_charge_always_and_peek_sees_overdraft() {
        let g = Gcra::from_kind(&LimitKind::Bytes {
            bytes: 1000,
            per: Duration::from_secs(60),
        })
        .unwrap();
        let (inc, tol) = g.params(400, 1);
        let (_, ptol) = g.params(0, 1);
        let mut tat = None;
        let mut verdicts = vec![];
        for _ in 0..3 {
            let s = step(tat, 0, inc, tol, Op::Charge);
            tat = s.store;
            verdicts.push(s.wait.is_none());
        }
        assert_eq!(verdicts, [true, true, false]);
        assert!(step(tat, 0, 0, ptol, Op::Peek).wait.is_some());
        // 1200 bytes charged against 1000/min: the budget is back just after 12 s.
        assert_eq!(step(tat, 12_000_000_000, 0, ptol, Op::Peek).wait, Some(1));
        assert_eq!(step(tat, 12_000_000_001, 0, ptol, Op::Peek).wait, None);
    }
}
