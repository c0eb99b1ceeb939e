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
