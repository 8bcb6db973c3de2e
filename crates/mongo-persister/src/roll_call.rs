//! Which persisters read the NATS stream now: every persister on a NATS cloud answers
//! a roll call on [`SUBJECT`] with its role, and calls the roll once at start, after
//! it set up the stream. Replicas share the stream's one consumer, each taking a share
//! of every node's messages, while a Sparkplug host must see all of a node's messages to
//! follow its `seq` numbers (a replica beside it would make it see gaps and send
//! Rebirths without end). So a host beside any other persister, or a replica beside a
//! host, refuses to start and says why ([`refusal`]).
//!
//! A persister that died does not answer: nothing is left behind to retire. Two started
//! within the same instant may both miss each other; a roll call with no answer within
//! [`WINDOW`] finds nobody.

use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;

/// The roll call's subject (core NATS, no stream).
pub const SUBJECT: &str = "iot.persisters";
/// How long answers to a roll call are waited for.
pub const WINDOW: Duration = Duration::from_secs(1);
/// The start of a Sparkplug host's role.
const HOST: &str = "sparkplug host";

/// A persister's role: `sparkplug host <id>` with `--ingest sparkplug`, else `replica`.
pub fn role(sparkplug_host: Option<&str>) -> String {
    match sparkplug_host {
        Some(id) => format!("{HOST} {id}"),
        None => "replica".to_string(),
    }
}

/// Answers every other persister's roll call with `role` (in the background, for as
/// long as `client` lives), then calls the roll: the roles of the others that answered
/// within [`WINDOW`].
pub async fn call(client: &async_nats::Client, role: &str) -> anyhow::Result<Vec<String>> {
    // A roll call carries its caller's id, so that one does not answer itself.
    let me = client.new_inbox();
    let mut calls = client
        .subscribe(SUBJECT)
        .await
        .context("cannot answer the persisters' roll call")?;
    let (answerer, answer) = (client.clone(), role.to_string());
    let own = me.clone();
    tokio::spawn(async move {
        while let Some(call) = calls.next().await {
            if call.payload.as_ref() == own.as_bytes() {
                continue;
            }
            if let Some(reply) = call.reply {
                let _ = answerer.publish(reply, answer.clone().into()).await;
            }
        }
    });
    let mut answers = client
        .subscribe(me.clone())
        .await
        .context("cannot call the persisters' roll")?;
    client
        .publish_with_reply(SUBJECT, me.clone(), me.clone().into())
        .await
        .context("cannot call the persisters' roll")?;
    client
        .flush()
        .await
        .context("cannot call the persisters' roll")?;
    let mut others = Vec::new();
    let deadline = tokio::time::Instant::now() + WINDOW;
    while let Ok(Some(answer)) = tokio::time::timeout_at(deadline, answers.next()).await {
        others.push(String::from_utf8_lossy(&answer.payload).into_owned());
    }
    Ok(others)
}

/// Why a persister with `role` may not read the stream beside `others`, if it may not.
pub fn refusal(role: &str, others: &[String]) -> Option<String> {
    let hosts: Vec<&String> = others.iter().filter(|o| o.starts_with(HOST)).collect();
    if role.starts_with(HOST) && !others.is_empty() {
        Some(format!(
            "other persisters read the NATS stream ({}): a Sparkplug host must see every message of a node, and persisters share the stream's messages; stop the others, or run this one without --ingest sparkplug",
            others.join(", ")
        ))
    } else if !hosts.is_empty() {
        Some(format!(
            "a Sparkplug host reads the NATS stream ({}) and must see every message of a node: this persister would take a share of them; run no other persister beside a Sparkplug host",
            hosts.iter().map(|h| h.as_str()).collect::<Vec<_>>().join(", ")
        ))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparkplug_host_reads_alone_and_replicas_share() {
        let host = role(Some("scada-1"));
        let replica = role(None);
        assert_eq!(host, "sparkplug host scada-1");
        assert_eq!(refusal(&host, &[]), None);
        assert_eq!(refusal(&replica, &[]), None);
        assert_eq!(refusal(&replica, &[replica.clone(), replica.clone()]), None);
        let beside_replica = refusal(&host, std::slice::from_ref(&replica)).expect("refused");
        assert!(beside_replica.contains("(replica)"), "{beside_replica}");
        let beside_host = refusal(&replica, &[replica.clone(), host.clone()]).expect("refused");
        assert!(
            beside_host.contains("(sparkplug host scada-1)"),
            "{beside_host}"
        );
        assert!(refusal(&host, std::slice::from_ref(&host)).is_some());
    }
}
