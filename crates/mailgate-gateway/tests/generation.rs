//! Each decision records the directory generation it was made under (issue 16 item 5): with
//! several nodes reloading at their own moments, a decision can then be told apart from a
//! directory change that came after it.

#![allow(clippy::unwrap_used, reason = "tests")]

use mailgate_core::engine::{Credential, Door, SendAttempt};
use mailgate_core::orgfile::OrgFile;
use mailgate_gateway::Gateway;
use mailgate_store::Changeset;

const ORG: &str =
    "domains: [{name: example.com, verified: true}]\nusers:\n  - email: a@example.com\n";
const ORG2: &str = "domains: [{name: example.com, verified: true}]\nusers:\n  - email: a@example.com\n  - email: b@example.com\n";

fn attempt() -> SendAttempt {
    SendAttempt::new(
        Door::Smtp,
        Credential::SmtpLogin {
            user: "a@example.com".into(),
        },
    )
    .from("a@example.com")
    .to(["x@example.org"])
    .parsed(10)
}

#[tokio::test]
async fn a_kept_decision_names_the_directory_generation_it_was_made_under() {
    let (stores, _db) = mailgate_store::testing::fresh_store().await;
    let store = stores.directory;
    let one = OrgFile::parse(ORG).unwrap().directory;
    store
        .commit(0, &Changeset::between(&Default::default(), &one), "t")
        .await
        .unwrap();
    let gw = Gateway::open(store.clone()).await.unwrap();
    let generation_of = |body: serde_json::Value| body["directory_generation"].as_i64();

    let first = gw.decide("smtp", &attempt()).await.unwrap();
    gw.store().flush().await.unwrap();
    let kept = gw.decision(&first.id).await.unwrap().unwrap();
    assert_eq!(generation_of(kept.body.parse().unwrap()), Some(1));

    // A change the gateway has not loaded yet is not the generation of its decisions...
    let two = OrgFile::parse(ORG2).unwrap().directory;
    store
        .commit(1, &Changeset::between(&one, &two), "t")
        .await
        .unwrap();
    let before = gw.explain(&attempt()).await.unwrap();
    let kept = gw.decision(&before.id).await.unwrap().unwrap();
    assert_eq!(generation_of(kept.body.parse().unwrap()), Some(1));
    // ...until it is in force.
    gw.refresh().await.unwrap();
    let after = gw.explain(&attempt()).await.unwrap();
    let kept = gw.decision(&after.id).await.unwrap().unwrap();
    assert_eq!(generation_of(kept.body.parse().unwrap()), Some(2));
}
