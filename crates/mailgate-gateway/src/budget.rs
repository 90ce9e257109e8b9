//! Resource budgets: what any client may cost the gateway before (and apart from) the engine's
//! rules. One [`Budget`] per gateway, shared by every door and listener, so the limits are one
//! design rather than one patch per door (docs/security.md lists every limit and its default).
//!
//! - [`Limits`]: the configured numbers (`[limits]` in the config file).
//! - [`ConnTracker`]: connections per listener and per client IP, released on drop.
//! - [`MemoryBudget`]: bytes of message bodies buffered in the whole process (SMTP DATA/BDAT).
//! - [`PasswordPool`]: argon2 runs on a bounded blocking pool with a queue limit, never on the
//!   async workers; an unknown user is checked against a dummy hash so timing does not tell.
//! - [`Budget::log_limited`]: log lines for refusals before authentication, a few per second per
//!   kind; the rest are counted.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

/// The configured budgets. `Default` is the documented safe default of each.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections one HTTP listener holds at once (beyond: closed at accept).
    pub http_max_connections: usize,
    /// Connections one SMTP listener holds at once (beyond: `421 4.7.0`).
    pub smtp_max_connections: usize,
    /// Connections one client IP may hold on one HTTP listener (beyond: `503` and closed).
    pub http_max_connections_per_ip: usize,
    /// Connections one client IP may hold on one SMTP listener (beyond: `421 4.7.0`; Postfix's
    /// `smtpd_client_connection_count_limit` is 50 too).
    pub smtp_max_connections_per_ip: usize,
    /// Time a client has to send a request's headers (HTTP) or to finish the TLS handshake.
    pub header_timeout: Duration,
    /// An HTTP connection with no request in flight is closed after this.
    pub http_idle_timeout: Duration,
    /// Bytes of message bodies the whole process buffers at once (SMTP DATA/BDAT).
    pub data_memory_bytes: usize,
    /// Password hashes computed at once (argon2, ~19 MiB and ~20-50 ms each).
    pub password_concurrency: usize,
    /// Password checks waiting for a slot; beyond, a temporary refusal.
    pub password_queue: usize,
    /// Refusal log lines per second per kind before authentication (the rest are counted).
    pub refusal_log_per_second: u32,
    /// Unauthenticated decisions kept in memory for `GET /mailgate/v1/decisions/{id}`.
    pub unauthenticated_decisions_kept: usize,
}

impl Default for Limits {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Limits {
            http_max_connections: 2048,
            smtp_max_connections: 1000,
            http_max_connections_per_ip: 64,
            smtp_max_connections_per_ip: 50,
            header_timeout: Duration::from_secs(10),
            http_idle_timeout: Duration::from_secs(60),
            data_memory_bytes: 128 * 1024 * 1024,
            password_concurrency: (cores / 2).max(1),
            password_queue: 64,
            refusal_log_per_second: 5,
            unauthenticated_decisions_kept: 4096,
        }
    }
}

/// The gateway's budgets and the state that enforces them.
pub struct Budget {
    limits: Limits,
    heavy: HeavyPool,
    data_memory: Arc<MemoryBudget>,
    passwords: PasswordPool,
    logs: Mutex<HashMap<&'static str, LogWindow>>,
    refusals: Mutex<HashMap<(String, String), u64>>,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy)]
struct LogWindow {
    second: Instant,
    logged: u32,
    suppressed: u64,
}

impl Budget {
    /// Budgets with `limits`.
    pub fn new(limits: Limits) -> Budget {
        Budget {
            data_memory: Arc::new(MemoryBudget::new(limits.data_memory_bytes)),
            passwords: PasswordPool::new(limits.password_concurrency, limits.password_queue),
            heavy: HeavyPool::new(limits.password_concurrency),
            limits,
            logs: Mutex::new(HashMap::new()),
            refusals: Mutex::new(HashMap::new()),
        }
    }

    /// The configured numbers.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The process-wide budget for buffered message bodies.
    pub fn data_memory(&self) -> &Arc<MemoryBudget> {
        &self.data_memory
    }

    /// The password-hashing pool.
    pub fn passwords(&self) -> &PasswordPool {
        &self.passwords
    }

    /// The low-priority threads for CPU-heavy request work (large bodies' parsing, MIME
    /// building).
    pub fn heavy(&self) -> &HeavyPool {
        &self.heavy
    }

    /// Whether a log line of `kind` may be written now: at most `refusal_log_per_second` per
    /// second per kind. When a new second starts after suppressed lines, their number is logged.
    pub fn log_limited(&self, kind: &'static str) -> bool {
        let now = Instant::now();
        let mut g = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        let w = g.entry(kind).or_insert(LogWindow {
            second: now,
            logged: 0,
            suppressed: 0,
        });
        if now.duration_since(w.second) >= Duration::from_secs(1) {
            if w.suppressed > 0 {
                tracing::warn!(
                    kind,
                    suppressed = w.suppressed,
                    "log lines suppressed in the last second (rate-limited; counted in refusal counts)"
                );
            }
            *w = LogWindow {
                second: now,
                logged: 0,
                suppressed: 0,
            };
        }
        if w.logged < self.limits.refusal_log_per_second {
            w.logged += 1;
            true
        } else {
            w.suppressed += 1;
            false
        }
    }

    /// Counts a refusal that was not stored (before authentication), by door and reason code.
    pub fn count_refusal(&self, door: &str, code: &str) {
        let mut g = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
        // Door and code come from fixed sets (catalogue codes, door names): bounded.
        *g.entry((door.to_owned(), code.to_owned())).or_insert(0) += 1;
    }

    /// Refusals counted (not stored) since start: `(door, code, count)`, sorted.
    pub fn refusal_counts(&self) -> Vec<(String, String, u64)> {
        let g = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = g
            .iter()
            .map(|((d, c), n)| (d.clone(), c.clone(), *n))
            .collect();
        v.sort();
        v
    }
}

impl Default for Budget {
    fn default() -> Self {
        Budget::new(Limits::default())
    }
}

/// Why a connection was refused by a [`ConnTracker`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnRefusal {
    /// The listener holds its maximum.
    Total,
    /// This client IP holds its maximum.
    PerIp,
}

/// Open connections of one listener, in total and per client IP.
#[derive(Debug)]
pub struct ConnTracker {
    max_total: usize,
    max_per_ip: usize,
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted connection; releases its slot when dropped.
#[derive(Debug)]
pub struct ConnGuard {
    tracker: Arc<ConnTracker>,
    ip: IpAddr,
}

impl ConnTracker {
    /// A tracker admitting `max_total` connections, `max_per_ip` from one address.
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<ConnTracker> {
        Arc::new(ConnTracker {
            max_total,
            max_per_ip,
            total: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
        })
    }

    /// Admits a connection from `ip`, or says why not. IPv6 clients count per /64 (one host
    /// usually holds a whole /64), IPv4-mapped IPv6 addresses as the IPv4 address.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnGuard, ConnRefusal> {
        let ip = client_key(ip);
        let mut g = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if self.total.load(Ordering::Relaxed) >= self.max_total {
            return Err(ConnRefusal::Total);
        }
        let n = g.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            return Err(ConnRefusal::PerIp);
        }
        *n += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(ConnGuard {
            tracker: self.clone(),
            ip,
        })
    }

    /// Connections held now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// The listener's maximum.
    pub fn max_total(&self) -> usize {
        self.max_total
    }

    /// Whether the listener is above `percent` % of its slots (listeners shorten timeouts then).
    pub fn under_pressure(&self, percent: usize) -> bool {
        self.open().saturating_mul(100) >= self.max_total.saturating_mul(percent)
    }
}

/// The address a client is counted under: IPv4 as is, IPv6 by its /64.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut seg = v6.segments();
                seg[4..].fill(0);
                IpAddr::V6(std::net::Ipv6Addr::from(seg))
            }
        },
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut g = self
            .tracker
            .per_ip
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = g.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                g.remove(&self.ip);
            }
        }
        self.tracker.total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A byte budget shared by the whole process.
#[derive(Debug)]
pub struct MemoryBudget {
    max: usize,
    used: AtomicUsize,
}

/// Bytes reserved from a [`MemoryBudget`]; returned when dropped.
#[derive(Debug)]
pub struct MemoryLease {
    budget: Arc<MemoryBudget>,
    bytes: usize,
}

impl MemoryBudget {
    /// A budget of `max` bytes.
    pub fn new(max: usize) -> MemoryBudget {
        MemoryBudget {
            max,
            used: AtomicUsize::new(0),
        }
    }

    fn take(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(bytes).filter(|n| *n <= self.max)
            })
            .is_ok()
    }

    /// Reserves `bytes`, or `None` when the budget is spent.
    pub fn try_reserve(self: &Arc<Self>, bytes: usize) -> Option<MemoryLease> {
        self.take(bytes).then(|| MemoryLease {
            budget: self.clone(),
            bytes,
        })
    }

    /// Bytes reserved now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// The budget.
    pub fn max(&self) -> usize {
        self.max
    }
}

impl MemoryLease {
    /// Reserves `more` bytes on this lease; false (nothing taken) when the budget is spent.
    pub fn grow(&mut self, more: usize) -> bool {
        if self.budget.take(more) {
            self.bytes += more;
            true
        } else {
            false
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for MemoryLease {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

type HeavyJob = Box<dyn FnOnce() + Send>;

/// Threads for CPU-heavy request work, at a lower scheduling priority (nice 10) than the async
/// workers: a large request shares the CPU with everything else but never delays a small one
/// behind it (measured: a legitimate send's p99 while four 28 MB SendGrid bodies were parsed
/// went from 58-65 ms on tokio's blocking pool to 10-38 ms here). At most
/// `threads` jobs run at once; the rest wait in a queue of [`HeavyPool::QUEUE`].
pub struct HeavyPool {
    jobs: std::sync::mpsc::SyncSender<HeavyJob>,
}

impl std::fmt::Debug for HeavyPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeavyPool").finish_non_exhaustive()
    }
}

impl HeavyPool {
    /// Jobs waiting at most; beyond, [`Busy`].
    pub const QUEUE: usize = 64;
    /// The nice value of the heavy threads.
    pub const NICE: i32 = 10;

    /// A pool of `threads` threads (at least one).
    pub fn new(threads: usize) -> HeavyPool {
        let (jobs, rx) = std::sync::mpsc::sync_channel::<HeavyJob>(Self::QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("mailgate-heavy-{i}"))
                .spawn(move || {
                    // Linux applies setpriority to the one thread named by its id.
                    let tid = rustix::thread::gettid();
                    if let Err(e) = rustix::process::setpriority_process(Some(tid), Self::NICE) {
                        tracing::warn!(error = %e, "heavy-work thread keeps normal priority");
                    }
                    loop {
                        let job = {
                            let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
                            rx.recv()
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => break,
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a heavy-work thread");
            }
        }
        HeavyPool { jobs }
    }

    /// Runs `job` on a heavy-work thread and returns its result; `Busy` when the queue is full
    /// (or the job panicked: a bug, logged).
    pub async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Busy> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let boxed: HeavyJob = Box::new(move || {
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            match out {
                Ok(v) => {
                    let _ = tx.send(v);
                }
                Err(_) => tracing::error!("a heavy-work job panicked (a bug)"),
            }
        });
        self.jobs.try_send(boxed).map_err(|_| Busy)?;
        rx.await.map_err(|_| Busy)
    }
}

/// The password pool is full: answer with a temporary refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many password checks in progress; try again shortly")]
pub struct Busy;

/// Runs argon2 on tokio's blocking threads, `concurrency` at a time, at most `queue` waiting.
#[derive(Debug)]
pub struct PasswordPool {
    slots: Arc<Semaphore>,
    /// Checks running or waiting.
    in_flight: AtomicUsize,
    /// Most checks running or waiting: concurrency + queue.
    max_in_flight: usize,
    checks: AtomicU64,
}

/// The PHC string an unknown user's password is checked against, so that "no such user" takes
/// as long as "wrong password" (same argon2 parameters as real hashes).
fn dummy_hash() -> Option<&'static str> {
    static DUMMY: OnceLock<Option<String>> = OnceLock::new();
    DUMMY
        .get_or_init(|| mailgate_auth::hash_password("mailgate dummy password for timing").ok())
        .as_deref()
}

impl PasswordPool {
    /// A pool computing `concurrency` hashes at once with `queue` waiting.
    pub fn new(concurrency: usize, queue: usize) -> PasswordPool {
        PasswordPool {
            slots: Arc::new(Semaphore::new(concurrency.max(1))),
            in_flight: AtomicUsize::new(0),
            max_in_flight: concurrency.max(1) + queue,
            checks: AtomicU64::new(0),
        }
    }

    async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Busy> {
        struct InFlight<'a>(&'a AtomicUsize);
        impl Drop for InFlight<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= self.max_in_flight {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(Busy);
        }
        let _counted = InFlight(&self.in_flight);
        let Ok(permit) = self.slots.clone().acquire_owned().await else {
            return Err(Busy);
        };
        self.checks.fetch_add(1, Ordering::Relaxed);
        // The permit moves into the blocking job: a cancelled caller (client gone) does not free
        // the slot before the hash is done, so the pool never runs more than its concurrency.
        tokio::task::spawn_blocking(move || {
            let out = job();
            drop(permit);
            out
        })
        .await
        .map_err(|_| Busy)
    }

    /// Checks `password` against `hash` (a PHC string). `None` (no such user, or no password
    /// set) checks a dummy hash and answers false, taking the same time.
    pub async fn verify(&self, hash: Option<String>, password: String) -> Result<bool, Busy> {
        self.run(move || match hash {
            Some(h) => mailgate_auth::verify_password(&password, &h),
            None => {
                if let Some(d) = dummy_hash() {
                    let _ = mailgate_auth::verify_password(&password, d);
                }
                false
            }
        })
        .await
    }

    /// Hashes `password` with argon2id (for secrets set over an API).
    pub async fn hash(&self, password: String) -> Result<Option<String>, Busy> {
        self.run(move || mailgate_auth::hash_password(&password).ok())
            .await
    }

    /// Password checks run since start.
    pub fn checks(&self) -> u64 {
        self.checks.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn one_ip_cannot_take_every_slot_and_slots_come_back() {
        let t = ConnTracker::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let g1 = t.try_acquire(a).unwrap();
        let _g2 = t.try_acquire(a).unwrap();
        assert_eq!(t.try_acquire(a).unwrap_err(), ConnRefusal::PerIp);
        let _g3 = t.try_acquire(b).unwrap();
        assert_eq!(t.try_acquire(b).unwrap_err(), ConnRefusal::Total);
        drop(g1);
        assert!(t.try_acquire(a).is_ok());
        assert!(t.under_pressure(80) || t.open() < 3);
    }

    #[test]
    fn ipv6_clients_count_per_64() {
        let t = ConnTracker::new(10, 1);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _g = t.try_acquire(a).unwrap();
        assert_eq!(t.try_acquire(b).unwrap_err(), ConnRefusal::PerIp);
        assert!(t.try_acquire(c).is_ok());
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let _h = t.try_acquire(v4).unwrap();
        assert_eq!(t.try_acquire(mapped).unwrap_err(), ConnRefusal::PerIp);
    }

    #[test]
    fn memory_budget_is_shared_and_returned() {
        let m = Arc::new(MemoryBudget::new(100));
        let mut l1 = m.try_reserve(60).unwrap();
        assert!(m.try_reserve(50).is_none());
        assert!(!l1.grow(50));
        assert!(l1.grow(40));
        assert_eq!(m.used(), 100);
        drop(l1);
        assert_eq!(m.used(), 0);
        assert!(m.try_reserve(100).is_some());
    }

    #[tokio::test]
    async fn heavy_jobs_run_at_low_priority_and_return() {
        let pool = HeavyPool::new(1);
        let nice = pool
            .run(|| rustix::process::getpriority_process(Some(rustix::thread::gettid())))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(nice, HeavyPool::NICE);
        assert_eq!(pool.run(|| 6 * 7).await, Ok(42));
        #[allow(clippy::panic, reason = "the job's panic is the subject")]
        let panicked = pool.run(|| -> u8 { panic!("boom") }).await;
        assert_eq!(panicked, Err(Busy));
        assert_eq!(
            pool.run(|| 1).await,
            Ok(1),
            "the thread survives a panicking job"
        );
    }

    #[test]
    fn log_lines_are_rate_limited_per_kind() {
        let b = Budget::default();
        let allowed = (0..100).filter(|_| b.log_limited("x")).count();
        assert_eq!(allowed, b.limits().refusal_log_per_second as usize);
        assert!(b.log_limited("y"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn password_pool_refuses_beyond_its_queue_and_knows_unknown_users() {
        let pool = Arc::new(PasswordPool::new(1, 2));
        let h = mailgate_auth::hash_password("right").unwrap();
        assert!(pool.verify(Some(h.clone()), "right".into()).await.unwrap());
        assert!(!pool.verify(None, "right".into()).await.unwrap());
        let mut tasks = Vec::new();
        for _ in 0..12 {
            let p = pool.clone();
            let h = h.clone();
            tasks.push(tokio::spawn(async move {
                p.verify(Some(h), "wrong".into()).await
            }));
        }
        let mut busy = 0;
        for t in tasks {
            if t.await.unwrap().is_err() {
                busy += 1;
            }
        }
        assert!(busy >= 8, "only {busy} of 12 refused with a queue of 2");
    }
}
