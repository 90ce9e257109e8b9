//! The nodes serving from this store (`mailgate status`, `GET /mailgate/v1/status`): each with
//! its last heartbeat, whether it counts as live, and the delivery leases it holds.
//!
//! A node is a row of the store's `nodes` table, written by every `mailgate serve` under its
//! `[node] id` every [`HEARTBEAT`] (and when it loads a new directory generation), deleted when
//! it stops cleanly. It is live while that row is fresh: written within three heartbeats plus
//! its directory poll interval, and, for a node on the host asking, while its process exists
//! (the rule writers use to wait for a change to be live everywhere,
//! [`mailgate_gateway::nodes::is_running`]). Leases are counted from the queue
//! ([`QueueStore::leases_by_node`]): unexpired leases, per node; a node that died holding leases
//! is listed by them (not live) until they expire or it starts again and takes them back.

use mailgate_gateway::nodes::{HEARTBEAT, is_running};
use mailgate_store::{QueueStore, Store};
use serde::Serialize;

use crate::AdminError;

/// One node, as `mailgate status` prints it and the admin API answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeStatus {
    /// The node's id (`[node] id`).
    pub id: String,
    /// Whether it counts as running now (see the module documentation).
    pub live: bool,
    /// Its host name (`None`: known only by the leases it holds, it has no row).
    pub host: Option<String>,
    /// Its process id on that host.
    pub pid: Option<u32>,
    /// When it last wrote its row (Unix ms).
    pub last_heartbeat_ms: Option<i64>,
    /// How long ago that was (ms; never negative).
    pub heartbeat_age_ms: Option<i64>,
    /// The directory generation it has in force.
    pub generation: Option<i64>,
    /// Messages it holds an unexpired delivery lease on.
    pub leases: u64,
}

/// Every node, by id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    /// When this was read (Unix ms).
    pub now_ms: i64,
    /// How often a node writes its row when nothing changes (ms).
    pub heartbeat_interval_ms: i64,
    /// The nodes with a row and the nodes holding leases, by id.
    pub nodes: Vec<NodeStatus>,
}

/// The nodes serving from `store` at `now_ms`, with the leases `queue` records for each.
pub async fn status(
    store: &dyn Store,
    queue: &dyn QueueStore,
    now_ms: i64,
) -> Result<Status, AdminError> {
    let rows = store.nodes().await?;
    let leases = queue.leases_by_node(now_ms).await?;
    let mut nodes: Vec<NodeStatus> = rows
        .iter()
        .map(|n| NodeStatus {
            id: n.id.clone(),
            live: is_running(n, now_ms),
            host: Some(n.host.clone()),
            pid: Some(n.pid),
            last_heartbeat_ms: Some(n.seen_ms),
            heartbeat_age_ms: Some(now_ms.saturating_sub(n.seen_ms).max(0)),
            generation: Some(n.generation),
            leases: 0,
        })
        .collect();
    for held in leases {
        match nodes.iter_mut().find(|n| n.id == held.node) {
            Some(n) => n.leases = held.leases,
            None => nodes.push(NodeStatus {
                id: held.node,
                live: false,
                host: None,
                pid: None,
                last_heartbeat_ms: None,
                heartbeat_age_ms: None,
                generation: None,
                leases: held.leases,
            }),
        }
    }
    nodes.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(Status {
        now_ms,
        heartbeat_interval_ms: HEARTBEAT.as_millis() as i64,
        nodes,
    })
}

/// `mailgate status`'s lines: one per node, tab-separated (id, live or not, heartbeat age,
/// leases, generation, host and pid).
pub fn lines(status: &Status) -> Vec<String> {
    status
        .nodes
        .iter()
        .map(|n| {
            let heartbeat = match n.heartbeat_age_ms {
                Some(age) => format!("heartbeat {:.1}s ago", age as f64 / 1000.0),
                None => "no heartbeat".to_owned(),
            };
            let place = match (&n.host, n.pid) {
                (Some(host), Some(pid)) => format!("{host} pid {pid}"),
                _ => "gone (holds leases until they expire)".to_owned(),
            };
            let generation = n
                .generation
                .map_or_else(|| "generation -".to_owned(), |g| format!("generation {g}"));
            format!(
                "{}\t{}\t{heartbeat}\t{} leases\t{generation}\t{place}",
                n.id,
                if n.live { "live" } else { "not live" },
                n.leases,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailgate_store::{NewMessage, NodeState, lease_owner};

    fn row(id: &str, pid: u32, seen_ms: i64) -> NodeState {
        NodeState {
            id: id.into(),
            host: mailgate_gateway::nodes::NodeIdentity::current().host,
            pid,
            generation: 4,
            seen_ms,
            interval_ms: 500,
        }
    }

    /// A fresh row of a process that exists is live with its leases; a stale one is not; a node
    /// with leases and no row is listed by its leases, not live.
    #[tokio::test]
    async fn nodes_are_listed_with_their_heartbeat_liveness_and_leases() {
        let stores = mailgate_store::in_memory().await.unwrap();
        let now = 10_000_000;
        let me = std::process::id();
        stores
            .directory
            .node_seen(&row("a", me, now - 1_000))
            .await
            .unwrap();
        stores
            .directory
            .node_seen(&row("b", me, now - 60_000))
            .await
            .unwrap();
        for (i, owner) in [
            lease_owner("a", "r1", 0),
            lease_owner("a", "r1", 1),
            lease_owner("gone", "r0", 0),
        ]
        .iter()
        .enumerate()
        {
            let id = format!("m{i}");
            stores
                .directory
                .accept_message(
                    &NewMessage {
                        id: id.clone(),
                        decision_id: format!("d{i}"),
                        accepted_at_ms: 1,
                        door: "smtp".into(),
                        principal: "a@example.com".into(),
                        envelope_from: "a@example.com".into(),
                        recipients: vec!["b@example.org".into()],
                        raw: b"Subject: x\r\n\r\nx\r\n".to_vec(),
                        state: mailgate_store::MessageState::Queued,
                        hold_until_ms: None,
                    },
                    None,
                )
                .await
                .unwrap();
            let got = stores.queue.lease_due(owner, now, 60_000, 1).await.unwrap();
            assert_eq!(got.len(), 1);
        }
        let s = status(stores.directory.as_ref(), stores.queue.as_ref(), now)
            .await
            .unwrap();
        let summary: Vec<_> = s
            .nodes
            .iter()
            .map(|n| (n.id.as_str(), n.live, n.leases, n.heartbeat_age_ms))
            .collect();
        assert_eq!(
            summary,
            [
                ("a", true, 2, Some(1_000)),
                ("b", false, 0, Some(60_000)),
                ("gone", false, 1, None),
            ]
        );
        let text = lines(&s);
        assert!(
            text[0].starts_with("a\tlive\theartbeat 1.0s ago\t2 leases"),
            "{text:?}"
        );
        assert!(
            text[1].starts_with("b\tnot live\theartbeat 60.0s ago"),
            "{text:?}"
        );
        assert!(text[2].contains("gone (holds leases"), "{text:?}");
    }
}
