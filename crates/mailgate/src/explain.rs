//! `mailgate explain`: prints what `mailgate_admin::explain` decides.

use mailgate_admin::explain::{ExplainRequest, explain, to_text};

/// `mailgate explain`: exit 3 when the send would be refused.
pub(crate) async fn cli(
    store: std::sync::Arc<mailgate_store::SqliteStore>,
    req: &ExplainRequest,
    json: bool,
) -> anyhow::Result<std::process::ExitCode> {
    let gateway = mailgate_gateway::Gateway::open(store.clone()).await?;
    mailgate_admin::faults::load(&gateway, store.as_ref()).await?;
    match explain(&gateway, req).await? {
        Ok(d) => {
            let hint = req.principal_hint();
            if json {
                let mut v = mailgate_gateway::decision_json(&d.decision, &d.id);
                if let (Some(h), Some(o)) = (hint, v.as_object_mut()) {
                    o.insert("hint".into(), h.into());
                }
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", to_text(&d.decision, &d.id));
                if let Some(h) = hint {
                    println!("\n{h}");
                }
            }
            if !d.decision.accepted() {
                return Ok(std::process::ExitCode::from(3));
            }
        }
        Err(bad) => anyhow::bail!("explain: {bad}"),
    }
    Ok(std::process::ExitCode::SUCCESS)
}
