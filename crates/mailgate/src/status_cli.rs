//! `mailgate status`: the nodes serving from the store (what `mailgate_admin::status` reads),
//! printed one line per node, or as the admin API's JSON with `--json`.

use mailgate_store::{QueueStore, Store};

/// Prints the nodes; an empty store says so on standard error.
pub(crate) async fn status(
    store: &dyn Store,
    queue: &dyn QueueStore,
    json: bool,
) -> anyhow::Result<()> {
    let now = mailgate_gateway::now_ms() as i64;
    let status = mailgate_admin::status::status(store, queue, now).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    if status.nodes.is_empty() {
        crate::queue_cli::empty("no node serves from this store (`mailgate serve` starts one)");
    }
    for line in mailgate_admin::status::lines(&status) {
        println!("{line}");
    }
    Ok(())
}
