//! Failed-AUTH lockout per login and per client IP (`auth.locked`, 454 4.7.0).
//!
//! Shared by every SMTP listener of one gateway. Memory is bounded: entries expire after the
//! window, and the table is pruned (then, if still full, cleared) when it reaches its cap.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Thresholds.
#[derive(Debug, Clone, Copy)]
pub struct LockoutPolicy {
    /// Failures of one login within `window` that lock it.
    pub per_login: u32,
    /// Failures from one client IP within `window` that lock it.
    pub per_ip: u32,
    /// Counting window, and how long a lock lasts.
    pub window: Duration,
    /// Most entries kept.
    pub max_entries: usize,
}

impl Default for LockoutPolicy {
    fn default() -> Self {
        LockoutPolicy {
            per_login: 5,
            per_ip: 20,
            window: Duration::from_secs(15 * 60),
            max_entries: 100_000,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    since: Instant,
    locked_until: Option<Instant>,
}

/// The lockout table.
#[derive(Debug)]
pub struct Lockout {
    policy: LockoutPolicy,
    entries: Mutex<HashMap<String, Entry>>,
}

fn login_key(login: &str) -> String {
    format!("login:{}", login.to_ascii_lowercase())
}

fn ip_key(ip: IpAddr) -> String {
    format!("ip:{ip}")
}

impl Lockout {
    /// A table with `policy`.
    pub fn new(policy: LockoutPolicy) -> Lockout {
        Lockout {
            policy,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut HashMap<String, Entry>) -> R) -> R {
        let mut g = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g)
    }

    /// Whether `login` (when given) or `ip` is locked at `now`.
    pub fn is_locked(&self, login: Option<&str>, ip: IpAddr, now: Instant) -> bool {
        self.with(|m| {
            let locked = |k: &str| {
                m.get(k)
                    .and_then(|e| e.locked_until)
                    .is_some_and(|t| t > now)
            };
            locked(&ip_key(ip)) || login.is_some_and(|l| locked(&login_key(l)))
        })
    }

    /// Records a failed AUTH.
    pub fn failed(&self, login: Option<&str>, ip: IpAddr, now: Instant) {
        let p = self.policy;
        self.with(|m| {
            if m.len() >= p.max_entries {
                m.retain(|_, e| {
                    now.duration_since(e.since) < p.window
                        || e.locked_until.is_some_and(|t| t > now)
                });
                if m.len() >= p.max_entries {
                    m.clear();
                }
            }
            let mut bump = |k: String, max: u32| {
                let e = m.entry(k).or_insert(Entry {
                    failures: 0,
                    since: now,
                    locked_until: None,
                });
                if now.duration_since(e.since) >= p.window {
                    *e = Entry {
                        failures: 0,
                        since: now,
                        locked_until: None,
                    };
                }
                e.failures = e.failures.saturating_add(1);
                if e.failures >= max {
                    e.locked_until = Some(now + p.window);
                }
            };
            bump(ip_key(ip), p.per_ip);
            if let Some(l) = login {
                bump(login_key(l), p.per_login);
            }
        });
    }

    /// Records a successful AUTH: the login's failures are forgotten.
    pub fn succeeded(&self, login: &str) {
        self.with(|m| {
            m.remove(&login_key(login));
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_per_login_and_per_ip_and_expires() {
        let l = Lockout::new(LockoutPolicy {
            per_login: 2,
            per_ip: 3,
            window: Duration::from_secs(60),
            max_entries: 10,
        });
        let ip: IpAddr = [127, 0, 0, 1].into();
        let other: IpAddr = [127, 0, 0, 2].into();
        let t = Instant::now();
        l.failed(Some("A@x"), ip, t);
        assert!(!l.is_locked(Some("a@x"), ip, t));
        l.failed(Some("a@x"), other, t);
        assert!(l.is_locked(Some("a@x"), [127, 0, 0, 9].into(), t));
        assert!(!l.is_locked(Some("b@x"), ip, t));
        l.failed(Some("c@x"), ip, t);
        assert!(!l.is_locked(Some("b@x"), ip, t));
        l.failed(None, ip, t);
        assert!(l.is_locked(Some("b@x"), ip, t), "the IP is locked after 3");
        assert!(!l.is_locked(Some("a@x"), ip, t + Duration::from_secs(61)));
        l.succeeded("a@x");
        assert!(!l.is_locked(Some("a@x"), other, t));
    }

    #[test]
    fn table_is_bounded() {
        let l = Lockout::new(LockoutPolicy {
            max_entries: 8,
            ..LockoutPolicy::default()
        });
        let t = Instant::now();
        for i in 0..100u32 {
            l.failed(Some(&format!("u{i}")), [127, 0, 0, 1].into(), t);
        }
        assert!(l.with(|m| m.len()) <= 8);
    }
}
