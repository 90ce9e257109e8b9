//! `mailgate explain`: prints what `mailgate_admin::explain` decides.

use mailgate_admin::explain::{ExplainRequest, explain, to_text};

/// `mailgate explain`: exit 3 when the send would be refused.
pub(crate) async fn cli(
    store: std::sync::Arc<dyn mailgate_store::Store>,
    req: &ExplainRequest,
    json: bool,
) -> anyhow::Result<std::process::ExitCode> {
    // Opening the gateway puts the injected faults in force, as a running server has them.
    let gateway = mailgate_gateway::Gateway::open(store).await?;
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
