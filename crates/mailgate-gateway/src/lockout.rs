//! Failed-authentication lockout (`auth.locked`), shared by every door of one gateway (the SMTP
//! listeners and the Gmail consent page): reached as [`crate::Gateway::lockout`].
//!
//! It protects the user, not the attacker:
//!
//! * **Per (login, client network)**, not per login: the network is the /24 for IPv4 and the /64
//!   for IPv6 (an IPv4-mapped IPv6 address counts as IPv4). Wrong passwords from one network
//!   never lock the same login out of another network, so an attacker elsewhere cannot lock the
//!   victim out.
//! * **Exponential back-off**, not a fixed lock: after `login_threshold` (5) failures for one
//!   (login, network) the pair is locked for `base_lock` (1 s), doubling with each further failure
//!   up to `max_lock` (15 min). A success resets the pair. Attempts refused *because* of a lock
//!   are not verified and not counted.
//! * **Per network across logins** (password spraying): the same back-off with a higher threshold,
//!   `network_threshold` (50). A success does not reset it (an attacker's own valid account must
//!   not launder its spraying). Shared relays (one NAT address for a whole office) should raise
//!   it: see [`LockoutPolicy`].
//! * **Bounded memory that never forgets an active lock**: at most `max_entries` entries (logins
//!   are kept as a keyed 64-bit hash, so an entry is a few dozen bytes whatever the login's
//!   length). When the table is full, only entries that are not locked are evicted: forgotten
//!   ones first, then those that never reached a lock, then the oldest. If every entry is an active lock, a failure that would need a
//!   new entry is not recorded as a count but locks its whole network "by pressure" (a small
//!   fixed-size side table keyed by network hash): the gateway fails closed for new attackers,
//!   never open.
//!
//! Entries that are not locked are forgotten `forget_after` (15 min) after their last failure or
//! the end of their last lock, whichever is later.
//!
//! **Shared by every node** (issue 16 item 5): once [`Lockout::share`]d with the store (the
//! gateway does it when it opens), the doors call the `*_shared` methods, which keep this table
//! as a cache in front and count every failure in the store's [`LockoutStore`] as well, under
//! the same keys on every node (`l:<SHA-256 of the lowercase login, 128 bits>:<network>` and
//! `n:<network>`: never a login in clear, never a secret), so guesses spread over several nodes
//! add up and lock the login on all of them. "Locked or not" reads the shared count (after this
//! table, which can only be stricter for its own node). The store's table has the same bounds
//! as this one (one row per key, forgotten when quiet, at most `max_entries` rows, failing
//! closed for the network when full of locks). Its writes are bounded per node: a failure is
//! counted after a password check, which the argon2 pool paces (`limits.password_concurrency`),
//! and at most [`Lockout::share`]'s `failures_per_second` failures a second are written (two
//! rows each); beyond, a failure is counted on this node only. When the store cannot be reached,
//! this node's own table decides alone (docs/security.md).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mailgate_store::{Counted, LockoutRule, LockoutStore};

/// Lockout thresholds and bounds. `Default` is the recommended setting for a gateway whose
/// clients each have their own address.
///
/// Recommended settings for a **shared relay** (many users behind one NAT address or one
/// upstream MTA): keep `login_threshold` at 5 (it is per login, so users do not share it), and
/// raise `network_threshold` to about 10 wrong passwords per user of the network per 15 min
/// (e.g. 500 for 50 users), or the typos of an office would lock the whole office for a while.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockoutPolicy {
    /// Failures of one login from one network before it is locked (default 5).
    pub login_threshold: u32,
    /// Failures from one network, across logins, before the network is locked (default 50).
    pub network_threshold: u32,
    /// First lock (default 1 s); each further failure doubles it.
    pub base_lock: Duration,
    /// Longest lock (default 15 min).
    pub max_lock: Duration,
    /// How long an entry that is not locked is remembered after its last failure or the end of
    /// its last lock (default 15 min).
    pub forget_after: Duration,
    /// Most entries kept (default 100,000; an entry is under 100 bytes).
    pub max_entries: usize,
    /// IPv4 network prefix length (default 24).
    pub ipv4_prefix: u8,
    /// IPv6 network prefix length (default 64).
    pub ipv6_prefix: u8,
}

impl Default for LockoutPolicy {
    fn default() -> Self {
        LockoutPolicy {
            login_threshold: 5,
            network_threshold: 50,
            base_lock: Duration::from_secs(1),
            max_lock: Duration::from_secs(15 * 60),
            forget_after: Duration::from_secs(15 * 60),
            max_entries: 100_000,
            ipv4_prefix: 24,
            ipv6_prefix: 64,
        }
    }
}

/// A client network (the address masked to the policy's prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Net {
    V4(u32),
    V6(u128),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    /// A login (keyed hash of its lowercase form) from a network.
    Login(u64, Net),
    /// A network, across logins.
    Net(Net),
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    /// Last failure.
    last: Instant,
    locked_until: Option<Instant>,
}

impl Entry {
    fn locked(&self, now: Instant) -> bool {
        self.locked_until.is_some_and(|t| t > now)
    }

    /// When it may be forgotten (if it is not locked then).
    fn forget_at(&self, forget_after: Duration) -> Instant {
        let last = match self.locked_until {
            Some(t) if t > self.last => t,
            _ => self.last,
        };
        last + forget_after
    }
}

/// Slots of the pressure side table (networks locked because the table was full of locks).
const PRESSURE_SLOTS: usize = 4096;

#[derive(Debug)]
struct Table {
    policy: LockoutPolicy,
    entries: HashMap<Key, Entry>,
    /// Per network hash slot: locked until (fail closed when the table is full of locks).
    pressure: Vec<Option<Instant>>,
    /// No eviction sweep before this (the last one found only active locks).
    next_sweep: Option<Instant>,
    /// Failures recorded as pressure locks (not counted in the table).
    pressure_events: u64,
}

/// The lockout table.
#[derive(Debug)]
pub struct Lockout {
    hasher: RandomState,
    table: Mutex<Table>,
    shared: OnceLock<Shared>,
}

/// The store every node counts failures in, and this node's budget of writes to it.
struct Shared {
    store: Arc<dyn LockoutStore>,
    per_second: u32,
    /// The current second and the failures written in it.
    window: Mutex<(Instant, u32)>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("per_second", &self.per_second)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// One failure's writes from this second's budget.
    fn take(&self, now: Instant) -> bool {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if now.saturating_duration_since(w.0) >= Duration::from_secs(1) {
            *w = (now, 0);
        }
        if w.1 >= self.per_second {
            return false;
        }
        w.1 += 1;
        true
    }
}

impl Default for Lockout {
    fn default() -> Self {
        Lockout::new(LockoutPolicy::default())
    }
}

impl Lockout {
    /// A table with `policy`.
    pub fn new(policy: LockoutPolicy) -> Lockout {
        Lockout {
            hasher: RandomState::new(),
            table: Mutex::new(Table {
                policy,
                entries: HashMap::new(),
                pressure: vec![None; PRESSURE_SLOTS],
                next_sweep: None,
                pressure_events: 0,
            }),
            shared: OnceLock::new(),
        }
    }

    /// Counts failures in `store` too, shared by every node on it (once; later calls change
    /// nothing), writing at most `failures_per_second` failures a second from this node.
    pub fn share(&self, store: Arc<dyn LockoutStore>, failures_per_second: u32) {
        let _ = self.shared.set(Shared {
            store,
            per_second: failures_per_second,
            window: Mutex::new((Instant::now(), 0)),
        });
    }

    /// The keys of `login` from `ip` in the shared store: the pair's, then the network's. The
    /// same on every node (an unkeyed hash, unlike this table's).
    fn shared_keys(&self, login: &str, ip: IpAddr) -> [String; 2] {
        let net = match network(ip, &self.policy()) {
            Net::V4(v) => format!("4:{v:08x}"),
            Net::V6(v) => format!("6:{v:032x}"),
        };
        let login = mailgate_auth::sha256_hex(login.to_ascii_lowercase().as_bytes());
        [format!("l:{}:{net}", &login[..32]), format!("n:{net}")]
    }

    /// [`Lockout::check`], then the count every node shares: `Err` with the wait when this
    /// node's table or the shared store has the login or its network locked. The store
    /// unreachable, this node's table decides alone.
    pub async fn check_shared(&self, login: &str, ip: IpAddr) -> Result<(), Duration> {
        self.check(login, ip, Instant::now())?;
        let Some(shared) = self.shared.get() else {
            return Ok(());
        };
        let now_ms = unix_ms();
        let [pair, net] = self.shared_keys(login, ip);
        match shared
            .store
            .locked_until(&[pair.as_str(), net.as_str()], now_ms)
            .await
        {
            Ok(Some(until)) if until > now_ms => Err(Duration::from_millis(
                u64::try_from(until - now_ms).unwrap_or(0),
            )),
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, "shared lockout unreadable: this node's count decides");
                Ok(())
            }
        }
    }

    /// [`Lockout::failure`], and the failure counted in the shared store (within this node's
    /// write budget). A key the store has no room for locks its network here, by pressure.
    pub async fn failure_shared(&self, login: &str, ip: IpAddr) {
        let now = Instant::now();
        self.failure(login, ip, now);
        let Some(shared) = self.shared.get() else {
            return;
        };
        if !shared.take(now) {
            tracing::debug!("shared lockout write budget spent: failure counted on this node only");
            return;
        }
        let p = self.policy();
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let [pair, net] = self.shared_keys(login, ip);
        for (key, threshold) in [(pair, p.login_threshold), (net, p.network_threshold)] {
            let rule = LockoutRule {
                threshold,
                base_lock_ms: ms(p.base_lock),
                max_lock_ms: ms(p.max_lock),
                forget_after_ms: ms(p.forget_after),
                max_rows: p.max_entries as u64,
            };
            match shared.store.count_failure(&key, &rule, unix_ms()).await {
                Ok(Counted::Full) => self.press(ip, now),
                Ok(Counted::Counted { .. }) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "shared lockout not written: counted on this node only");
                    return;
                }
            }
        }
    }

    /// [`Lockout::success`], and the pair's shared count forgotten.
    pub async fn success_shared(&self, login: &str, ip: IpAddr) {
        self.success(login, ip, Instant::now());
        let Some(shared) = self.shared.get() else {
            return;
        };
        let [pair, _] = self.shared_keys(login, ip);
        if let Err(e) = shared.store.clear_failures(&pair).await {
            tracing::warn!(error = %e, "shared lockout not reset");
        }
    }

    /// Locks `ip`'s network by pressure (no room to count it).
    fn press(&self, ip: IpAddr, now: Instant) {
        let slot_of = |net| self.slot(net);
        self.with(|t| {
            let net = network(ip, &t.policy);
            press(t, slot_of(net), net, now);
        });
    }

    /// Replaces the policy (the configuration's `[limits]`); counts already kept stay.
    pub fn set_policy(&self, policy: LockoutPolicy) {
        self.with(|t| t.policy = policy);
    }

    /// The policy in force.
    pub fn policy(&self) -> LockoutPolicy {
        self.with(|t| t.policy)
    }

    /// Entries kept now (for metrics and tests).
    pub fn len(&self) -> usize {
        self.with(|t| t.entries.len())
    }

    /// Whether no entry is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Failures that found the table full of active locks and locked their network instead.
    pub fn pressure_events(&self) -> u64 {
        self.with(|t| t.pressure_events)
    }

    fn with<R>(&self, f: impl FnOnce(&mut Table) -> R) -> R {
        let mut g = self.table.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g)
    }

    fn login_hash(&self, login: &str) -> u64 {
        let mut h = self.hasher.build_hasher();
        for b in login.bytes() {
            h.write_u8(b.to_ascii_lowercase());
        }
        h.write_u8(0xff);
        h.finish()
    }

    fn slot(&self, net: Net) -> usize {
        let mut h = self.hasher.build_hasher();
        match net {
            Net::V4(v) => {
                h.write_u8(4);
                h.write_u32(v);
            }
            Net::V6(v) => {
                h.write_u8(6);
                h.write_u128(v);
            }
        }
        (h.finish() % PRESSURE_SLOTS as u64) as usize
    }

    /// `Ok` when `login` may try to authenticate from `ip` at `now`; otherwise how long until it
    /// may (the pair, its network or the table's pressure is locked). Check before verifying a
    /// secret, and do not verify (or count) a locked attempt.
    pub fn check(&self, login: &str, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let lh = self.login_hash(login);
        self.with(|t| {
            let net = network(ip, &t.policy);
            let until = [Key::Login(lh, net), Key::Net(net)]
                .iter()
                .filter_map(|k| t.entries.get(k).and_then(|e| e.locked_until))
                .chain(t.pressure.get(self.slot(net)).copied().flatten())
                .filter(|u| *u > now)
                .max();
            match until {
                Some(u) => Err(u.saturating_duration_since(now)),
                None => Ok(()),
            }
        })
    }

    /// Records a failed authentication of `login` from `ip`.
    pub fn failure(&self, login: &str, ip: IpAddr, now: Instant) {
        let lh = self.login_hash(login);
        self.with(|t| {
            let p = t.policy;
            let net = network(ip, &p);
            let mut pressured = false;
            for (key, threshold) in [
                (Key::Login(lh, net), p.login_threshold),
                (Key::Net(net), p.network_threshold),
            ] {
                if !t.entries.contains_key(&key) && !make_room(t, now) {
                    pressured = true;
                    continue;
                }
                let e = t.entries.entry(key).or_insert(Entry {
                    failures: 0,
                    last: now,
                    locked_until: None,
                });
                if !e.locked(now) && e.forget_at(p.forget_after) <= now {
                    // Forgotten: start again.
                    *e = Entry {
                        failures: 0,
                        last: now,
                        locked_until: None,
                    };
                }
                e.failures = e.failures.saturating_add(1);
                e.last = now;
                if let Some(lock) = lock_for(e.failures, threshold, &p) {
                    let until = now + lock;
                    if e.locked_until.is_none_or(|u| u < until) {
                        e.locked_until = Some(until);
                    }
                }
            }
            if pressured {
                press(t, self.slot(net), net, now);
            }
        });
    }

    /// Records a successful authentication: the (login, network) pair starts again. The network's
    /// own count is kept (a sprayer's valid account must not reset it).
    pub fn success(&self, login: &str, ip: IpAddr, now: Instant) {
        let _ = now;
        let lh = self.login_hash(login);
        self.with(|t| {
            let net = network(ip, &t.policy);
            t.entries.remove(&Key::Login(lh, net));
        });
    }
}

/// Unix milliseconds now (the shared store's clock: every node's wall clock).
fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Locks `net` (whose pressure slot is `slot`) because a failure of it could not be counted.
fn press(t: &mut Table, slot: usize, net: Net, now: Instant) {
    let p = t.policy;
    t.pressure_events = t.pressure_events.saturating_add(1);
    // Until the first active lock ends (room may open then), within the policy's bounds.
    let first_end = t
        .next_sweep
        .map(|u| u.saturating_duration_since(now))
        .unwrap_or(p.base_lock);
    let lock = first_end.clamp(p.base_lock, p.max_lock.max(p.base_lock));
    if let Some(s) = t.pressure.get_mut(slot) {
        let until = now + lock;
        if s.is_none_or(|u| u < until) {
            *s = Some(until);
        }
    }
    // The network's own entry, if kept, is locked too.
    if let Some(e) = t.entries.get_mut(&Key::Net(net)) {
        let until = now + lock;
        if e.locked_until.is_none_or(|u| u < until) {
            e.locked_until = Some(until);
        }
    }
}

/// The lock after `failures` failures (`None` below the threshold).
fn lock_for(failures: u32, threshold: u32, p: &LockoutPolicy) -> Option<Duration> {
    let threshold = threshold.max(1);
    if failures < threshold {
        return None;
    }
    let doublings = failures - threshold;
    let lock = if doublings >= 31 {
        p.max_lock
    } else {
        p.base_lock
            .checked_mul(1 << doublings)
            .unwrap_or(p.max_lock)
    };
    Some(lock.min(p.max_lock))
}

/// Makes room for one new entry; `false` when every entry is an active lock (or the cap is 0).
fn make_room(t: &mut Table, now: Instant) -> bool {
    let cap = t.policy.max_entries;
    if t.entries.len() < cap {
        return true;
    }
    if cap == 0 || t.next_sweep.is_some_and(|n| n > now) {
        return false;
    }
    let forget_after = t.policy.forget_after;
    // Forgotten entries first.
    t.entries
        .retain(|_, e| e.locked(now) || e.forget_at(forget_after) > now);
    // Then the oldest entries that are not locked, down to 90 % of the cap (so that the sort is
    // paid once per tenth of the table, not once per failure); entries that never reached a lock
    // go first, so that a flood of new keys does not easily reset a pair's back-off.
    let target = cap - cap / 10;
    if t.entries.len() >= cap || t.entries.len() > target {
        let mut unlocked: Vec<(bool, Instant, Key)> = t
            .entries
            .iter()
            .filter(|(_, e)| !e.locked(now))
            .map(|(k, e)| (e.locked_until.is_some(), e.last, *k))
            .collect();
        unlocked.sort_unstable_by_key(|(was_locked, last, _)| (*was_locked, *last));
        let excess = t.entries.len().saturating_sub(target);
        for (_, _, k) in unlocked.into_iter().take(excess) {
            t.entries.remove(&k);
        }
    }
    if t.entries.len() < cap {
        t.next_sweep = None;
        return true;
    }
    // Every entry is an active lock: no sweep until the first one ends.
    t.next_sweep = t
        .entries
        .values()
        .filter_map(|e| e.locked_until)
        .filter(|u| *u > now)
        .min();
    false
}

/// The network of `ip` under `p`.
fn network(ip: IpAddr, p: &LockoutPolicy) -> Net {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let prefix = u32::from(p.ipv4_prefix.min(32));
            let mask = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - prefix)
            };
            Net::V4(bits & mask)
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let prefix = u32::from(p.ipv6_prefix.min(128));
            let mask = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - prefix)
            };
            Net::V6(bits & mask)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn failures_from_one_network_do_not_lock_the_login_from_another() {
        let l = Lockout::default();
        let t = Instant::now();
        for i in 0..20u8 {
            l.failure("frank@example.com", ip(&format!("10.0.0.{i}")), t);
        }
        assert!(l.check("frank@example.com", ip("10.0.0.77"), t).is_err());
        assert!(
            l.check("FRANK@example.com", ip("10.0.0.200"), t).is_err(),
            "logins are case-insensitive"
        );
        assert_eq!(l.check("frank@example.com", ip("10.0.1.5"), t), Ok(()));
        assert_eq!(l.check("alice@example.com", ip("10.0.0.7"), t), Ok(()));
        // IPv6: the /64 is the network.
        for _ in 0..5 {
            l.failure("frank@example.com", ip("2001:db8:0:1::1"), t);
        }
        assert!(
            l.check("frank@example.com", ip("2001:db8:0:1:ffff::9"), t)
                .is_err()
        );
        assert_eq!(
            l.check("frank@example.com", ip("2001:db8:0:2::1"), t),
            Ok(())
        );
        // An IPv4-mapped address is its IPv4 network.
        assert!(
            l.check("frank@example.com", ip("::ffff:10.0.0.9"), t)
                .is_err()
        );
    }

    #[test]
    fn back_off_starts_at_the_threshold_doubles_and_caps() {
        let l = Lockout::default();
        let a = ip("192.0.2.1");
        let t = Instant::now();
        for _ in 0..4 {
            l.failure("u@x", a, t);
        }
        assert_eq!(l.check("u@x", a, t), Ok(()), "4 failures: no lock yet");
        let mut expected = S;
        let mut now = t;
        for n in 5..30u32 {
            l.failure("u@x", a, now);
            let retry = l.check("u@x", a, now).unwrap_err();
            assert_eq!(retry, expected.min(Duration::from_secs(900)), "failure {n}");
            // Not allowed a moment before the lock ends, allowed at its end.
            assert!(
                l.check("u@x", a, now + retry - Duration::from_millis(1))
                    .is_err()
            );
            now += retry;
            assert_eq!(l.check("u@x", a, now), Ok(()));
            expected *= 2;
        }
        assert_eq!(
            l.check("u@x", a, now - Duration::from_millis(1)),
            Err(Duration::from_millis(1))
        );
        // A success resets the pair.
        l.success("u@x", a, now);
        l.failure("u@x", a, now);
        assert_eq!(l.check("u@x", a, now), Ok(()));
    }

    #[test]
    fn a_quiet_pair_is_forgotten() {
        let l = Lockout::default();
        let a = ip("192.0.2.1");
        let t = Instant::now();
        for _ in 0..4 {
            l.failure("u@x", a, t);
        }
        let later = t + Duration::from_secs(16 * 60);
        l.failure("u@x", a, later);
        assert_eq!(l.check("u@x", a, later), Ok(()), "the count started again");
    }

    #[test]
    fn spraying_one_network_across_logins_locks_the_network_with_back_off() {
        let l = Lockout::default();
        let t = Instant::now();
        for i in 0..49u32 {
            l.failure(&format!("user{i}@x"), ip("198.51.100.7"), t);
        }
        assert_eq!(l.check("new@x", ip("198.51.100.8"), t), Ok(()));
        l.failure("user49@x", ip("198.51.100.9"), t);
        assert_eq!(l.check("new@x", ip("198.51.100.8"), t), Err(S));
        assert_eq!(l.check("new@x", ip("198.51.101.8"), t), Ok(()));
        l.failure("user50@x", ip("198.51.100.9"), t + S);
        assert_eq!(l.check("new@x", ip("198.51.100.8"), t + S), Err(2 * S));
        // A success does not reset the network.
        l.success("user50@x", ip("198.51.100.9"), t + S);
        assert!(l.check("new@x", ip("198.51.100.8"), t + S).is_err());
    }

    #[test]
    fn eviction_never_forgets_an_active_lock() {
        // 102,000 failures from 5,100 networks: each network locks one login (12 failures: a
        // 128 s lock) and tries 8 other logins once; the table holds 20,000 entries.
        let l = Lockout::new(LockoutPolicy {
            max_entries: 20_000,
            ..LockoutPolicy::default()
        });
        let t = Instant::now();
        let net = |i: u32| IpAddr::from([10, (i >> 8) as u8, (i & 0xff) as u8, 1]);
        for i in 0..5_100u32 {
            let now = t + Duration::from_millis(u64::from(i));
            for _ in 0..12 {
                l.failure(&format!("victim{i}@x"), net(i), now);
            }
            for j in 0..8u32 {
                l.failure(&format!("spray{i}.{j}@x"), net(i), now);
            }
        }
        assert!(l.len() <= 20_000, "bounded: {}", l.len());
        assert!(l.len() > 10_000, "the table filled and was evicted from");
        let end = t + Duration::from_millis(5_100);
        for i in 0..5_100u32 {
            assert!(
                l.check(&format!("victim{i}@x"), net(i), end).is_err(),
                "victim{i} was forgotten"
            );
        }
        assert_eq!(l.pressure_events(), 0);
    }

    #[test]
    fn a_table_full_of_locks_fails_closed_for_new_keys() {
        let l = Lockout::new(LockoutPolicy {
            max_entries: 100,
            login_threshold: 1,
            network_threshold: 1,
            ..LockoutPolicy::default()
        });
        let t = Instant::now();
        // 50 networks, one login each: 100 locked entries.
        for i in 0..50u8 {
            l.failure("a@x", IpAddr::from([10, i, 0, 1]), t);
        }
        assert_eq!(l.len(), 100);
        // A new network's failure cannot be counted: its network is locked by pressure.
        let newcomer = IpAddr::from([172, 16, 0, 1]);
        assert_eq!(l.check("b@x", newcomer, t), Ok(()));
        l.failure("b@x", newcomer, t);
        assert_eq!(l.len(), 100, "still bounded");
        assert!(l.check("b@x", newcomer, t).is_err(), "fail closed");
        assert!(l.check("c@x", newcomer, t).is_err(), "the whole network");
        assert!(l.pressure_events() >= 1);
        // Every earlier lock is still there.
        for i in 0..50u8 {
            assert!(l.check("a@x", IpAddr::from([10, i, 0, 1]), t).is_err());
        }
        // Once the locks end, there is room again.
        let later = t + Duration::from_secs(20 * 60);
        assert_eq!(l.check("b@x", newcomer, later), Ok(()));
        l.failure("b@x", newcomer, later);
        assert_eq!(l.check("d@x", IpAddr::from([192, 0, 2, 1]), later), Ok(()));
    }

    #[test]
    fn long_logins_cost_no_memory() {
        let l = Lockout::new(LockoutPolicy {
            max_entries: 1_000,
            ..LockoutPolicy::default()
        });
        let t = Instant::now();
        let long = "x".repeat(4_000);
        for i in 0..5_000u32 {
            l.failure(&format!("{long}{i}"), ip("192.0.2.1"), t);
        }
        assert!(l.len() <= 1_000);
    }
}
