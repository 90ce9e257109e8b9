//! The running gateway nodes and the directory generation each has in force, so that a change
//! is live everywhere before the command that made it returns (issue 13: a script that creates
//! a key with `mailgate key create` and uses it at once must work; a suspension refuses the very
//! next send).
//!
//! Each serving process writes its row in the store ([`mailgate_store::NodeState`]) when it
//! loads a new generation and every [`HEARTBEAT`] otherwise, and deletes it when it stops. A
//! writer (the CLI, or a door's settings API) commits, then [`wait_until_live`]: it polls the rows
//! until every running node shows the new generation. A node counts as running while its row is
//! fresh (written within three heartbeats plus its poll interval) and, when it is on this host,
//! while its process exists (a node killed with SIGKILL is noticed at once and its row deleted).
//! The wait is bounded (twice the slowest node's poll interval plus a second); a node still
//! behind then is reported, never waited for forever: the change is committed either way.
//!
//! Why not re-read the generation on every request instead: that puts a store round trip on
//! every send of every door (a read per request; on PostgreSQL a network round trip) to serve
//! the rare moment after an edit. Waiting at the writer costs the writer at most one re-check
//! interval (500 ms by default) and the hot path nothing; on PostgreSQL a node reloads as soon
//! as the change is announced (`Store::spawn_change_listener`), so the writer usually waits
//! milliseconds, and the re-check interval (the `interval_ms` a node advertises, on which the
//! bound rests) is what a lost announcement costs.

use std::time::Duration;

use mailgate_store::{NodeState, Store, StoreError};

use crate::now_ms;

/// How often a node rewrites its row when nothing changed.
pub const HEARTBEAT: Duration = Duration::from_secs(2);

/// How long a node's message-id node number stays its own after its last heartbeat renewed it
/// ([`mailgate_store::NodeNumberStore`]): a node that died frees its number then. As long as the
/// nodes' clocks agree within this, a number's next holder makes ids only after the last one its
/// earlier holder made (the same bound as the concurrent-send slots' deadline).
pub const NODE_NUMBER_LEASE: Duration = Duration::from_secs(60);

/// This process as a node.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    /// The node's row id: its `[node] id` once the server named it
    /// ([`Gateway::join_as`](crate::Gateway::join_as)), so `mailgate status` lists a node under
    /// the name its leases and slots carry, and a node started again replaces its own row;
    /// before that (a gateway opened by a test or an admin verb), unique per process run: host,
    /// pid and start time.
    pub id: String,
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
}

impl NodeIdentity {
    /// This process, before it is named.
    pub fn current() -> NodeIdentity {
        let host = this_host();
        let pid = std::process::id();
        NodeIdentity {
            id: format!("{host}/{pid}/{}", now_ms()),
            host,
            pid,
        }
    }

    /// This process as node `node` (`[node] id`).
    pub fn named(node: &str) -> NodeIdentity {
        NodeIdentity {
            id: node.to_owned(),
            host: this_host(),
            pid: std::process::id(),
        }
    }
}

/// Whether `node`'s row says it is running at `now_ms` (Unix ms): written within three
/// heartbeats plus its poll interval and, when it is on this host, its process exists (a node
/// killed on this host is not running at once; one on another host once its row is that old).
pub fn is_running(node: &NodeState, now_ms: i64) -> bool {
    running(node, now_ms, &this_host())
}

fn this_host() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

/// What [`wait_until_live`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Propagation {
    /// Every running node has the generation in force (`nodes` of them; 0 when none runs).
    Live {
        /// How many nodes were running.
        nodes: usize,
    },
    /// These running nodes were still behind when the wait ended.
    Lagging(Vec<NodeState>),
}

/// Whether `node`'s row says it is running at `now`.
fn running(node: &NodeState, now: i64, host: &str) -> bool {
    let fresh = node.seen_ms + 3 * HEARTBEAT.as_millis() as i64 + node.interval_ms >= now;
    fresh && (node.host != host || process_exists(node.pid))
}

fn process_exists(pid: u32) -> bool {
    let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return false;
    };
    // EPERM: it exists but belongs to someone else.
    match rustix::process::test_kill_process(pid) {
        Ok(()) => true,
        Err(e) => e == rustix::io::Errno::PERM,
    }
}

/// Waits until every running node serving from `store` has directory generation `generation`
/// (or a later one) in force; see the module documentation for the bound.
pub async fn wait_until_live(
    store: &dyn Store,
    generation: i64,
) -> Result<Propagation, StoreError> {
    let host = this_host();
    let started = std::time::Instant::now();
    loop {
        let now = now_ms() as i64;
        let nodes = store.nodes().await?;
        let mut alive = Vec::new();
        for node in nodes {
            if running(&node, now, &host) {
                alive.push(node);
            } else if node.host == host && !process_exists(node.pid) {
                // Died without deleting its row: tidy up (anyone may).
                store.node_gone(&node.id).await?;
            }
        }
        let behind: Vec<NodeState> = alive
            .iter()
            .filter(|n| n.generation < generation)
            .cloned()
            .collect();
        if behind.is_empty() {
            return Ok(Propagation::Live { nodes: alive.len() });
        }
        let slowest = behind.iter().map(|n| n.interval_ms).max().unwrap_or(0);
        let bound = Duration::from_millis(2 * slowest.max(0) as u64) + Duration::from_secs(1);
        if started.elapsed() >= bound {
            return Ok(Propagation::Lagging(behind));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// [`wait_until_live`], logging nodes that stayed behind (the change is committed either way).
pub async fn wait_and_report(store: &dyn Store, generation: i64) {
    match wait_until_live(store, generation).await {
        Ok(Propagation::Live { .. }) => {}
        Ok(Propagation::Lagging(nodes)) => {
            for n in nodes {
                tracing::warn!(
                    node = %n.id,
                    has = n.generation,
                    wants = generation,
                    "a running gateway has not picked up the change yet (it will at its next poll of the store)"
                );
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not check that running gateways picked up the change")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(host: &str, pid: u32, generation: i64, seen_ms: i64) -> NodeState {
        NodeState {
            id: format!("{host}/{pid}/1"),
            host: host.into(),
            pid,
            generation,
            seen_ms,
            interval_ms: 500,
        }
    }

    #[test]
    fn a_stale_row_or_a_dead_local_process_is_not_running() {
        let now = 1_000_000;
        let me = std::process::id();
        assert!(running(&node("here", me, 1, now - 100), now, "here"));
        // Stale: beyond three heartbeats plus the poll interval.
        assert!(!running(&node("here", me, 1, now - 7_000), now, "here"));
        // Another host: trusted while fresh (its process cannot be checked from here).
        assert!(running(
            &node("there", 999_999_999, 1, now - 100),
            now,
            "here"
        ));
        // This host, a pid that does not exist.
        assert!(!running(
            &node("here", 999_999_999, 1, now - 100),
            now,
            "here"
        ));
    }

    /// Each node that joins leases its own message-id node number, which the ids this process
    /// makes carry; a node started again with the same id gets its number back; when other
    /// running nodes hold all 64, joining fails and says why.
    #[tokio::test]
    async fn joining_nodes_lease_different_numbers_that_message_ids_carry() {
        let dir = tempfile::tempdir().unwrap();
        let store = mailgate_store::open_path(&dir.path().join("db"))
            .await
            .unwrap()
            .directory;
        let a = crate::Gateway::open(store.clone()).await.unwrap();
        assert_eq!(a.node_number(), None, "not joined yet");
        a.join_as("a").await.unwrap();
        let na = a.node_number().unwrap();
        let b = crate::Gateway::open(store.clone()).await.unwrap();
        b.join_as("b").await.unwrap();
        let nb = b.node_number().unwrap();
        assert_ne!(na, nb);
        // This process's ids carry the number it leased last (one process is one node).
        let id = mailgate_store::new_message_id(now_ms());
        assert_eq!(mailgate_store::message_id_node(&id), Some(nb), "{id}");
        // Node a started again: its own number.
        let again = crate::Gateway::open(store.clone()).await.unwrap();
        again.join_as("a").await.unwrap();
        assert_eq!(again.node_number(), Some(na));
        // Every other number held by running nodes: a new node cannot join.
        let now = now_ms() as i64;
        for i in 0..mailgate_store::NODE_NUMBERS - 2 {
            let n = store
                .lease_node_number(&format!("other-{i}"), now, now + 60_000)
                .await
                .unwrap();
            assert!(n.is_some());
        }
        let late = crate::Gateway::open(store.clone()).await.unwrap();
        let err = late.join_as("late").await.unwrap_err().to_string();
        assert!(
            err.contains("all 64 message-id node numbers are held"),
            "{err}"
        );
        assert_eq!(late.node_number(), None);
    }

    #[tokio::test]
    async fn wait_returns_at_once_when_every_node_is_current_and_reports_one_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = mailgate_store::open_path(&dir.path().join("db"))
            .await
            .unwrap()
            .directory;
        let me = NodeIdentity::current();
        let row = |generation| NodeState {
            id: me.id.clone(),
            host: me.host.clone(),
            pid: me.pid,
            generation,
            seen_ms: now_ms() as i64,
            interval_ms: 50,
        };
        assert_eq!(
            wait_until_live(store.as_ref(), 3).await.unwrap(),
            Propagation::Live { nodes: 0 }
        );
        store.node_seen(&row(3)).await.unwrap();
        assert_eq!(
            wait_until_live(store.as_ref(), 3).await.unwrap(),
            Propagation::Live { nodes: 1 }
        );
        store.node_seen(&row(2)).await.unwrap();
        let t = std::time::Instant::now();
        let got = wait_until_live(store.as_ref(), 3).await.unwrap();
        assert!(
            matches!(got, Propagation::Lagging(ref n) if n.len() == 1),
            "{got:?}"
        );
        assert!(
            t.elapsed() >= Duration::from_millis(1_000),
            "waited its bound"
        );
        store.node_gone(&me.id).await.unwrap();
        assert!(store.nodes().await.unwrap().is_empty());
    }
}
