//! Directory changes announced to every node ([`Store::spawn_change_listener`] on PostgreSQL).
//! The triggers of migration `0006_directory_notify.sql` send a NOTIFY on [`CHANNEL`] when a
//! commit moves the directory generation or changes the injected faults; [`listen`] hears them
//! with sqlx's `PgListener` on a connection of its own (a one-connection pool: it never takes
//! one of the store's pool, and it is how `PgListener` reconnects).
//!
//! A NOTIFY sent while the listener's connection is down is lost: the listener notifies its
//! caller once each time it starts listening (at first and after every reconnection), so the
//! caller re-checks then, and the caller's periodic re-check covers the rest.
//!
//! [`Store::spawn_change_listener`]: crate::Store::spawn_change_listener

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use tokio::sync::Notify;

/// The channel the triggers notify (migration 0006).
pub(crate) const CHANNEL: &str = "mailgate_directory";

/// Longest pause between two attempts to listen while the database cannot be reached.
const MAX_PAUSE: Duration = Duration::from_secs(5);

/// A listening connection that lasted less than this was not a recovery: the next attempt waits
/// (a database that accepts connections and drops them at once is not hammered).
const STEADY: Duration = Duration::from_secs(1);

/// Listens on [`CHANNEL`] for as long as the task runs (through `pool`'s connect options, on a
/// pool of one connection of its own), notifying `changed` for every announcement and once each
/// time it starts listening. A lost connection is re-established, after a growing pause when
/// attempts fail.
pub(crate) async fn listen(pool: &PgPool, changed: Arc<Notify>) {
    let own = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .acquire_timeout(super::CONNECT_TIMEOUT)
        .connect_lazy_with((*pool.connect_options()).clone());
    let mut pause = Duration::from_millis(100);
    loop {
        let started = Instant::now();
        let attempt = async {
            let mut l = PgListener::connect_with(&own).await?;
            l.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        };
        match attempt.await {
            Ok(mut listener) => {
                // Listening from now on: whatever was committed before is not announced.
                changed.notify_one();
                let ended = loop {
                    match listener.try_recv().await {
                        Ok(Some(n)) => {
                            tracing::debug!(payload = n.payload(), "directory change announced");
                            changed.notify_one();
                        }
                        // Lost (and possibly re-established already): start over, so this
                        // loop notifies once it listens again.
                        Ok(None) => break "the connection was lost".to_owned(),
                        Err(e) => break e.to_string(),
                    }
                };
                tracing::info!(
                    why = %ended,
                    "directory changes: stopped listening; listening again (changes made meanwhile are picked up then)"
                );
            }
            Err(e) => tracing::warn!(
                error = %e,
                "directory changes: cannot listen; every node re-checks the directory every reload interval meanwhile"
            ),
        }
        if started.elapsed() < STEADY {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_PAUSE);
        } else {
            pause = Duration::from_millis(100);
        }
    }
}
