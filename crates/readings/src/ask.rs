//! `readings gaps --repair`: replay requests for what `gaps` found missing, sent
//! through the cloud broker as the persister's user and recorded in `repairs`.

use std::time::Duration;

use anyhow::Context;
use bson::Document;
use rumqttc::QoS;

use iot_core::bounds::{check_id, check_seq};
use iot_core::config::{BrokerSettings, CloudBroker};
use iot_core::mqtt::Connection;
use iot_core::replay::{self, Ranges, MAX_RANGES};
use iot_store::{describe, repairs, REPAIRS};
use mongodb::Database;

use crate::gaps::BootGaps;

/// Asks every device with missing readings to send them again (a replay request per
/// boot, on the cloud broker), says so on stderr, and records the asks in `repairs` as
/// the persister does (so `readings gaps` shows them, and the persister's replicas do
/// not ask for the same readings at once).
pub async fn ask_again(
    found: &[BootGaps],
    broker: &CloudBroker,
    db: &Database,
) -> anyhow::Result<()> {
    let asks = requests(found);
    if asks.is_empty() {
        eprintln!("readings: nothing missing, nothing to ask for");
        return Ok(());
    }
    let client_id = format!("readings-repair-{}", std::process::id());
    send(&asks, broker, &client_id).await?;
    record(&asks, db, &client_id).await;
    Ok(())
}

/// The requests, per device: its boot's missing ranges within the bounds a device
/// could have sent (ids of one topic level, `seq` within 1..=2^53, at most
/// [`MAX_RANGES`] ranges).
fn requests(found: &[BootGaps]) -> Vec<(String, Ranges)> {
    found
        .iter()
        .filter(|gaps| !gaps.missing.is_empty())
        .filter(|gaps| {
            let fine = check_id("device", &gaps.device).and(check_id("boot", &gaps.boot));
            if let Err(why) = &fine {
                eprintln!("readings: not asking {:.128}: {why}", gaps.device);
            }
            fine.is_ok()
        })
        .map(|gaps| {
            let ranges = gaps
                .missing
                .iter()
                .filter_map(|&(from, to)| {
                    Some((u64::try_from(from).ok()?, u64::try_from(to).ok()?))
                })
                .filter(|&(from, to)| check_seq(from).and(check_seq(to)).is_ok())
                .take(MAX_RANGES)
                .collect();
            (
                gaps.device.clone(),
                Ranges {
                    boot: gaps.boot.clone(),
                    ranges,
                },
            )
        })
        .collect()
}

/// Publishes the requests at QoS 1 and waits until the broker has them all.
async fn send(
    asks: &[(String, Ranges)],
    broker: &CloudBroker,
    client_id: &str,
) -> anyhow::Result<()> {
    let settings = BrokerSettings::from(broker.clone());
    let options = settings
        .mqtt_options(client_id, true)
        .context("cannot set up the broker connection")?;
    let mut connection = Connection::start(&settings, options);
    for (device, ranges) in asks {
        connection
            .publish(
                &replay::request_topic(device),
                QoS::AtLeastOnce,
                false,
                ranges.encode(),
            )
            .await?;
        let count: u64 = ranges.ranges.iter().map(|(from, to)| to - from + 1).sum();
        eprintln!(
            "readings: asked {device} (boot {}) to send {count} reading(s) again",
            ranges.boot
        );
    }
    if !connection
        .wait_acknowledged(Duration::from_secs(10))
        .await?
    {
        anyhow::bail!(
            "the cloud broker at {} did not take the requests",
            settings.address()
        );
    }
    connection.close(Duration::from_secs(5)).await
}

/// Records the requests in `repairs`; a failure is a warning, as they went out.
async fn record(asks: &[(String, Ranges)], db: &Database, client_id: &str) {
    let at = bson::DateTime::now();
    let records: Vec<Document> = asks
        .iter()
        .filter_map(|(device, asked)| {
            repairs::asked_by_hand(device, &asked.boot, &asked.ranges, client_id, at)
        })
        .collect();
    if records.is_empty() {
        return;
    }
    if let Err(error) = db
        .collection::<Document>(REPAIRS)
        .insert_many(records)
        .await
    {
        eprintln!(
            "readings: warning: the requests went out, but recording them in {REPAIRS} failed: {}",
            describe(&anyhow::Error::from(error))
        );
    }
}
