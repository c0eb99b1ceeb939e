//! The starvation guard's state: a token bucket of new clients per relay (giaddr, or 0.0.0.0
//! for the local segment). Pure: the service passes the time in (milliseconds of a monotonic
//! clock); `decide` only reads [`Limiter::allows`], the service charges a token with
//! [`Limiter::take`] when a new client was offered (or bound) an address.

use std::collections::HashMap;
use std::net::Ipv4Addr;

/// Most relays tracked; beyond this the full buckets are forgotten (a full bucket is the
/// same as no entry), and if all are in use the oldest-refilled half is dropped.
const MAX_KEYS: usize = 1024;

/// Token buckets keyed by relay address.
#[derive(Clone, Debug)]
pub struct Limiter {
    /// Tokens per second; 0 = unlimited.
    rate: u32,
    /// Bucket size.
    burst: u32,
    /// key → (tokens × 1000, last refill in ms).
    buckets: HashMap<Ipv4Addr, (u64, u64)>,
}

impl Limiter {
    /// A limiter of `rate` new clients a second after a burst of `burst` (at least 1).
    pub fn new(rate: u32, burst: u32) -> Limiter {
        Limiter { rate, burst: burst.max(1), buckets: HashMap::new() }
    }

    /// The limiter of a deployment: `rate` new clients a second after a burst of `burst` or of
    /// the nodes it expects (`swarm.expected_nodes`), whichever is larger. A rack of N nodes
    /// powered on together is N new clients within seconds, and a PXE ROM gives up after about a
    /// minute of retries: with a burst of 100 and 20 a second, 1000 such nodes took 81 s to be
    /// bound (`cargo bench --bench dhcp_rate -- storm`). Beyond the declared rack the rate holds.
    pub fn for_deployment(rate: u32, burst: u32, expected_nodes: u32) -> Limiter {
        Limiter::new(rate, burst.max(expected_nodes))
    }

    /// New clients admitted at once before the rate applies.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// No limit at all.
    pub fn unlimited() -> Limiter {
        Limiter::new(0, 1)
    }

    fn level(&self, key: Ipv4Addr, now_ms: u64) -> u64 {
        let cap = u64::from(self.burst) * 1000;
        match self.buckets.get(&key) {
            None => cap,
            Some(&(milli, at)) => {
                let gained = now_ms.saturating_sub(at).saturating_mul(u64::from(self.rate));
                milli.saturating_add(gained).min(cap)
            }
        }
    }

    /// Whether a new client relayed by `key` may get an address at `now_ms`.
    pub fn allows(&self, key: Ipv4Addr, now_ms: u64) -> bool {
        self.rate == 0 || self.level(key, now_ms) >= 1000
    }

    /// Spends one token of `key` (no-op when unlimited or empty).
    pub fn take(&mut self, key: Ipv4Addr, now_ms: u64) {
        if self.rate == 0 {
            return;
        }
        let level = self.level(key, now_ms).saturating_sub(1000);
        if self.buckets.len() >= MAX_KEYS && !self.buckets.contains_key(&key) {
            let cap = u64::from(self.burst) * 1000;
            let rate = u64::from(self.rate);
            self.buckets.retain(|_, (milli, at)| milli.saturating_add(now_ms.saturating_sub(*at).saturating_mul(rate)) < cap);
            if self.buckets.len() >= MAX_KEYS {
                let mut ats: Vec<u64> = self.buckets.values().map(|(_, at)| *at).collect();
                ats.sort_unstable();
                let cut = ats[ats.len() / 2];
                self.buckets.retain(|_, (_, at)| *at > cut);
            }
        }
        self.buckets.insert(key, (level, now_ms));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: Ipv4Addr = Ipv4Addr::UNSPECIFIED;

    #[test]
    fn burst_then_rate_per_relay() {
        let mut l = Limiter::new(2, 3);
        for _ in 0..3 {
            assert!(l.allows(LOCAL, 0));
            l.take(LOCAL, 0);
        }
        assert!(!l.allows(LOCAL, 0), "burst spent");
        // Another relay has its own bucket.
        assert!(l.allows(Ipv4Addr::new(10, 67, 0, 1), 0));
        // 2 per second: one token after 500 ms.
        assert!(!l.allows(LOCAL, 499));
        assert!(l.allows(LOCAL, 500));
        l.take(LOCAL, 500);
        assert!(!l.allows(LOCAL, 500));
        // Refill is capped at the burst.
        assert!(l.allows(LOCAL, 1_000_000));
        for _ in 0..3 {
            l.take(LOCAL, 1_000_000);
        }
        assert!(!l.allows(LOCAL, 1_000_000));
    }

    #[test]
    fn a_declared_rack_is_admitted_at_once_and_the_rate_holds_beyond_it() {
        let admitted = |mut l: Limiter| {
            let mut n = 0;
            while l.allows(LOCAL, 0) && n < 10_000 {
                l.take(LOCAL, 0);
                n += 1;
            }
            n
        };
        assert_eq!(admitted(Limiter::for_deployment(20, 100, 1000)), 1000);
        assert_eq!(admitted(Limiter::for_deployment(20, 100, 0)), 100, "no rack declared: the configured burst");
        assert_eq!(admitted(Limiter::for_deployment(20, 100, 40)), 100, "a small rack keeps the configured burst");
        let mut l = Limiter::for_deployment(20, 100, 1000);
        for _ in 0..1000 {
            l.take(LOCAL, 0);
        }
        assert!(!l.allows(LOCAL, 0) && !l.allows(LOCAL, 49) && l.allows(LOCAL, 50), "then 20 a second");
    }

    #[test]
    fn zero_rate_is_unlimited_and_keys_are_bounded() {
        let mut u = Limiter::unlimited();
        for _ in 0..10 {
            u.take(LOCAL, 0);
        }
        assert!(u.allows(LOCAL, 0));
        let mut l = Limiter::new(1, 1);
        for i in 0..(3 * MAX_KEYS as u32) {
            l.take(Ipv4Addr::from(i), u64::from(i));
        }
        assert!(l.buckets.len() <= MAX_KEYS);
    }
}
