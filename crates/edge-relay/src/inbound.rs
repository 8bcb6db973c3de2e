//! Cloud to edge: replay requests and the Sparkplug B host's commands and STATE, as the
//! bridge's `cloud-replay` connection carries them.
//!
//! A replay request (`/replay/<device>/request`, `iot_core::replay`) is answered from the
//! log first: each asked reading the relay still keeps goes to the cloud again, unchanged
//! but marked as a replay, as the device itself would send it, so a device that stopped,
//! sleeps or never kept a buffer is repaired all the same. Only the ranges the log does
//! not have go on to the device, which answers `gone` for what it has not either.
//! Sparkplug NCMD and STATE go on to the edge unchanged, retained as published.

use iot_core::replay::{mark_replay, request_topic, Ranges, MAX_PER_REQUEST, REQUESTS};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::forward::Replay;
use crate::log::Log;
use crate::mqtt5::{filter, Heard, Link, Message};

/// What the relay carries in from the cloud.
pub const FILTERS: [(&str, QoS); 3] = [
    (REQUESTS, QoS::AtLeastOnce),
    ("spBv1.0/+/NCMD/+", QoS::AtMostOnce),
    ("spBv1.0/STATE/+", QoS::AtLeastOnce),
];

/// Carries requests in from `link` until `shutdown`: to the edge through `edge`, and
/// the answers from the log to the cloud through `replays`.
pub async fn run(
    mut link: Link,
    log: Log,
    edge: AsyncClient,
    replays: mpsc::Sender<Replay>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let result = loop {
        let heard = tokio::select! {
            () = shutdown.cancelled() => break Ok(()),
            heard = link.recv() => heard,
        };
        match heard {
            Ok(Heard::Connected { .. }) => {
                let filters = FILTERS.iter().map(|(path, qos)| filter(path, *qos));
                if link.client.subscribe_many(filters).await.is_err() {
                    break Err(anyhow::anyhow!("the cloud-replay connection closed"));
                }
                tracing::info!(
                    "subscribed on the cloud broker to replay requests and Sparkplug commands"
                );
            }
            Ok(Heard::Message(message)) => {
                if let Err(error) = carry(&message, &log, &edge, &replays).await {
                    break Err(error);
                }
                // Handed on (a request that is lost now is asked again by the persister).
                if let Err(error) = link.ack(&message).await {
                    break Err(error);
                }
            }
            Err(error) => break Err(error),
        }
    };
    link.close().await;
    result
}

async fn carry(
    message: &Message,
    log: &Log,
    edge: &AsyncClient,
    replays: &mpsc::Sender<Replay>,
) -> anyhow::Result<()> {
    let Ok(topic) = message.topic() else {
        return Ok(());
    };
    let publish = &message.publish;
    let Some(device) = device_of_request(topic) else {
        edge.publish(topic, publish.qos, publish.retain, publish.payload.clone())
            .await
            .map_err(|_| anyhow::anyhow!("the edge connection closed"))?;
        return Ok(());
    };
    let request = match Ranges::parse(&publish.payload) {
        Ok(request) => request,
        Err(why) => {
            tracing::warn!(device, "replay request not carried: {why}");
            return Ok(());
        }
    };
    let device = device.to_string();
    let lookup = log.clone();
    let asked = request.clone();
    let answer = tokio::task::spawn_blocking(move || answer(&lookup, &device, &asked)).await??;
    let (from_log, to_device) = (answer.replays.len(), answer.rest.len());
    for replay in answer.replays {
        if replays.send(replay).await.is_err() {
            return Ok(()); // stopping
        }
    }
    let device = device_of_request(topic).unwrap_or_default();
    if !answer.rest.is_empty() {
        let rest = Ranges {
            boot: request.boot.clone(),
            ranges: answer.rest,
        };
        edge.publish(
            request_topic(device),
            QoS::AtLeastOnce,
            false,
            rest.encode(),
        )
        .await
        .map_err(|_| anyhow::anyhow!("the edge connection closed"))?;
    }
    tracing::info!(
        device,
        boot = request.boot,
        from_log,
        ranges_asked_of_device = to_device,
        "replay request answered"
    );
    Ok(())
}

/// The device of a `/replay/<device>/request` topic.
fn device_of_request(topic: &str) -> Option<&str> {
    let device = topic.strip_prefix("/replay/")?.strip_suffix("/request")?;
    (!device.is_empty() && !device.contains('/')).then_some(device)
}

/// What the log answers to a request.
#[derive(Debug, Default, PartialEq)]
pub struct Answer {
    /// Readings to publish again, marked as replays.
    pub replays: Vec<Replay>,
    /// Asked ranges the log does not have: for the device.
    pub rest: Vec<(u64, u64)>,
}

impl PartialEq for Replay {
    fn eq(&self, other: &Self) -> bool {
        self.topic == other.topic && self.payload == other.payload
    }
}

/// The log's answer to `request` for `device`: at most [`MAX_PER_REQUEST`] readings (the
/// cloud asks again for the rest; ranges past that bound are neither answered nor
/// passed on this time).
pub fn answer(log: &Log, device: &str, request: &Ranges) -> anyhow::Result<Answer> {
    let mut answer = Answer::default();
    let mut left = MAX_PER_REQUEST as usize;
    for &(from, to) in &request.ranges {
        if left == 0 {
            break;
        }
        let mut next = from;
        for (seq, number) in log.readings(device, &request.boot, (from, to), left)? {
            let Some(entry) = log.get(number)? else {
                continue;
            };
            let Some(payload) = mark_replay(&entry.payload) else {
                continue;
            };
            if seq > next {
                answer.rest.push((next, seq - 1));
            }
            next = next.max(seq + 1);
            answer.replays.push(Replay {
                topic: entry.topic,
                payload,
            });
            left -= 1;
        }
        if left > 0 && next <= to {
            answer.rest.push((next, to));
        }
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::Entry;

    fn reading(topic: &str, device: &str, seq: u64) -> Entry {
        Entry {
            topic: topic.into(),
            payload: format!(r#"{{"device":"{device}","boot":"b1","seq":{seq},"value":1.5}}"#)
                .into_bytes()
                .into(),
            qos: rumqttc::QoS::AtLeastOnce,
            retain: false,
            received_ms: 0,
            edge_pkid: 0,
        }
    }

    #[test]
    fn the_log_answers_what_it_has_and_leaves_the_rest_to_the_device() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (log, _) = Log::open(dir.path()).expect("open");
        let kept: Vec<Entry> = [3, 4, 5, 8, 9]
            .into_iter()
            .map(|seq| reading("/sensor/t-1/temperature", "t-1", seq))
            .collect();
        log.append(&kept).expect("append");
        let request = Ranges {
            boot: "b1".into(),
            ranges: vec![(1, 5), (7, 10), (20, 20)],
        };
        let answer = answer(&log, "t-1", &request).expect("answer");
        assert_eq!(answer.rest, [(1, 2), (7, 7), (10, 10), (20, 20)]);
        let seqs: Vec<String> = answer
            .replays
            .iter()
            .map(|replay| String::from_utf8_lossy(&replay.payload).into_owned())
            .collect();
        assert_eq!(seqs.len(), 5);
        assert!(
            seqs[0].ends_with(r#""seq":3,"value":1.5,"replay":true}"#),
            "{}",
            seqs[0]
        );
        assert!(answer
            .replays
            .iter()
            .all(|r| r.topic == "/sensor/t-1/temperature"));
        // Another boot, another device: all of it goes to the device.
        let other = Ranges {
            boot: "b2".into(),
            ranges: vec![(3, 4)],
        };
        assert_eq!(answer_of(&log, "t-1", &other).rest, [(3, 4)]);
        assert_eq!(answer_of(&log, "t-2", &request).replays, []);
    }

    #[test]
    fn one_answer_holds_at_most_the_protocols_bound() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (log, _) = Log::open(dir.path()).expect("open");
        let total = MAX_PER_REQUEST + 5;
        let kept: Vec<Entry> = (1..=total)
            .map(|seq| reading("/sensor/t-1/temperature", "t-1", seq))
            .collect();
        log.append(&kept).expect("append");
        let request = Ranges {
            boot: "b1".into(),
            ranges: vec![(1, total), (total + 10, total + 20)],
        };
        let answer = answer_of(&log, "t-1", &request);
        assert_eq!(answer.replays.len() as u64, MAX_PER_REQUEST);
        assert_eq!(
            answer.rest,
            [],
            "the cloud asks again for what is past the bound"
        );
    }

    fn answer_of(log: &Log, device: &str, request: &Ranges) -> Answer {
        answer(log, device, request).expect("answer")
    }

    #[test]
    fn request_topics_name_one_device() {
        assert_eq!(device_of_request("/replay/t-1/request"), Some("t-1"));
        assert_eq!(device_of_request("/replay//request"), None);
        assert_eq!(device_of_request("/replay/a/b/request"), None);
        assert_eq!(device_of_request("spBv1.0/g/NCMD/n"), None);
    }
}
