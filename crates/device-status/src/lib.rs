//! `device-status`: a device's presence on the edge broker.
//!
//! Registers a last will `offline` (QoS 1, retained) with the broker, publishes `online`
//! (retained) on every connection and every `--interval`, and on Ctrl-C or SIGTERM
//! publishes `offline` itself before disconnecting: a will fires only when a client
//! vanishes, so without that a cleanly stopped device would read `online` forever.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use iot_core::config::{parse_positive_seconds, parse_qos, BrokerSettings, LocalBroker};
use iot_core::mqtt::{Connection, Event};
use iot_core::topics;
use rumqttc::{LastWill, QoS};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// Payload while the device runs.
pub const ONLINE: &str = "online";
/// Payload once it stopped or vanished.
pub const OFFLINE: &str = "offline";

/// Device presence: `online` while running, `offline` (retained) once stopped or gone.
#[derive(Debug, Clone, Parser)]
#[command(name = "device-status", version)]
pub struct Config {
    /// Topic of the status messages and of the last will
    #[arg(long, env = "STATUS_TOPIC", default_value = topics::DEVICE_STATUS)]
    pub topic: String,
    /// Quality of service of `online` (the will and the final `offline` are always QoS 1)
    #[arg(long, env = "STATUS_QOS", value_parser = parse_qos, default_value = "1")]
    pub qos: QoS,
    /// Seconds between repeated `online` messages; fractions allowed
    #[arg(long, env = "STATUS_INTERVAL", value_name = "SECONDS", value_parser = parse_positive_seconds, default_value = "30")]
    pub interval: Duration,
    /// MQTT client id [default: device-status-<random>]
    #[arg(long, env = "STATUS_CLIENT_ID")]
    pub client_id: Option<String>,
    #[command(flatten)]
    pub broker: LocalBroker,
}

/// How long a stopping device waits for the broker to take its `offline`.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Keeps the status `online` until `shutdown`, then leaves it `offline`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let client_id = config
        .client_id
        .clone()
        .unwrap_or_else(|| format!("device-status-{}", iot_core::sensor::new_boot_id()));
    let broker = BrokerSettings::from(config.broker.clone());
    let mut options = broker
        .mqtt_options(&client_id, true)
        .context("cannot set up the broker connection")?;
    options.set_last_will(LastWill::new(
        &config.topic,
        OFFLINE,
        QoS::AtLeastOnce,
        true,
    ));
    tracing::info!(broker = %broker.address(), client_id, topic = config.topic, interval = ?config.interval, "reporting device status");

    let mut connection = Connection::start(&broker, options);
    let mut ticks = tokio::time::interval_at(Instant::now() + config.interval, config.interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            event = connection.recv() => {
                // After a reconnect the will may have fired meanwhile: say `online` again.
                if let Event::Connected { .. } = event? {
                    connection.publish(&config.topic, config.qos, true, ONLINE.into()).await?;
                    tracing::info!(topic = config.topic, "status online");
                }
            }
            _ = ticks.tick() => {
                connection.publish(&config.topic, config.qos, true, ONLINE.into()).await?;
                tracing::debug!(topic = config.topic, "status online (refresh)");
            }
        }
    }

    connection
        .publish(&config.topic, QoS::AtLeastOnce, true, OFFLINE.into())
        .await?;
    tracing::info!(topic = config.topic, "status offline, disconnecting");
    connection.close(STOP_TIMEOUT).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn defaults_are_the_seed_scripts() {
        let config = Config::try_parse_from(["device-status"]).expect("defaults parse");
        assert_eq!(config.topic, "/device/status");
        assert_eq!(config.interval, Duration::from_secs(30));
        assert_eq!(config.qos, QoS::AtLeastOnce);
    }

    #[test]
    fn a_zero_interval_is_refused() {
        assert!(Config::try_parse_from(["device-status", "--interval", "0"]).is_err());
    }

    #[test]
    fn help_names_the_variables() {
        let help = Config::command().render_long_help().to_string();
        for variable in [
            "STATUS_TOPIC",
            "STATUS_INTERVAL",
            "STATUS_QOS",
            "STATUS_CLIENT_ID",
            "LOCAL_BROKER",
            "LOCAL_PASSWORD",
        ] {
            assert!(help.contains(variable), "--help lacks {variable}");
        }
    }
}
