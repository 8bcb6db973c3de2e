//! `mongo-persister`: stores every reading and status change from the cloud broker in
//! MongoDB, at least once and without duplicates.
//!
//! The MQTT side runs with manual acknowledgements and a persistent session: a message
//! is acknowledged to the broker only after the write that holds it succeeded, so a
//! crash or a database outage loses nothing (the broker delivers again what was not
//! acknowledged). Writes happen in batches in a task of their own ([`writer`]), so the
//! MQTT event loop is never blocked by the database.
//!
//! Replicas share the stream through a shared subscription (`--share GROUP`). The
//! broker keeps routing a share of it to every member's persistent session, online or
//! not, so each replica's client id must stay the same across restarts; a replica
//! removed for good is retired (`--retire`): it stores what waited in its session, then
//! ends the session.
//!
//! With `nats://` addresses in `--broker` it reads a NATS JetStream cluster instead
//! ([`nats`]): one durable pull consumer shared by every replica.
//!
//! [`config`] holds the settings, [`persister`] the run itself ([`Persister`]: start,
//! one message, one batch written, drain and close), [`writer`] the database side,
//! [`repair`] the self-healing, [`sparkplug`] the Sparkplug B host's state and
//! commands, [`retire`] and [`ready`] their own small jobs.

pub mod budget;
pub mod config;
pub mod nats;
pub mod persister;
pub mod ready;
pub mod repair;
pub mod retire;
pub mod roll_call;
pub mod sparkplug;
pub mod writer;

use tokio_util::sync::CancellationToken;

pub use config::{Config, DEFAULT_CLIENT_ID};
pub use persister::Persister;

/// Stores messages until `shutdown` (or, retiring, until the session's queue is
/// drained); then writes the batch in hand, acknowledges it and disconnects.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    if let Some(settings) = config.nats().map_err(anyhow::Error::msg)? {
        return nats::run(&config, &settings, shutdown).await;
    }
    let mut persister = Persister::start(&config, &shutdown).await?;
    // An error here is the broker connection failing for good (a refused password):
    // nothing more can be acknowledged, so there is nothing to drain.
    persister.serve(&shutdown, config.stats_interval).await?;
    persister.finish().await
}
