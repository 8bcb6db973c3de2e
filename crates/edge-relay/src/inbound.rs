//! Cloud to edge: replay requests and the Sparkplug B host's commands and STATE, as the
//! bridge's `cloud-replay` connection carries them.
//!
//! A replay request (`/replay/<device>/request`, `iot_core::replay`) is answered from the
//! log first: each asked reading the relay still keeps goes to the cloud again, unchanged
//! but marked as a replay, as the device itself would send it, so a device that stopped,
//! sleeps or never kept a buffer is repaired all the same. Only the ranges the log does
//! not have go on to the device, which answers `gone` for what it has not either.
//! Sparkplug NCMD and STATE go on to the edge unchanged, retained as published.
//!
//! What one device can make the relay send again is bounded: an answer is read from the
//! log and sent a few messages at a time ([`ANSWER_BYTES`]), never built whole (10 000
//! readings of 2 MiB would be 20 GiB); a range answered from the log is not answered
//! again within [`HOLD`] (the persister asks again for a hole whose answer is still on
//! its way, or that it flagged); and each device may have [`BUDGET_BYTES`] a minute
//! sent again from the log, the rest of an answer left for a later request.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use iot_core::replay::{mark_replay, request_topic, Ranges, MAX_PER_REQUEST, REQUESTS};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::forward::Replay;
use crate::log::Log;
use crate::mqtt5::{filter, Heard, Link};

/// Replays waiting for the forwarder at most.
pub const REPLAY_QUEUE: usize = 16;
/// Bytes of an answer read from the log at once (but always one reading).
pub const ANSWER_BYTES: usize = 4 << 20;
/// How long a range answered from the log is not answered again.
pub const HOLD: Duration = Duration::from_secs(60);
/// Bytes one device may have sent again from the log a minute (and at once).
pub const BUDGET_BYTES: u64 = 32 << 20;
/// `(device, boot)` series whose answered ranges are remembered, at most; past it the
/// oldest answers are forgotten first (and may be answered again).
const MAX_REMEMBERED: usize = 10_000;
/// Answered ranges remembered per series.
const MAX_RANGES_REMEMBERED: usize = 64;

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
    let mut carrier = Carrier::new(log, edge, replays);
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
                if let Ok(topic) = message.topic() {
                    let publish = &message.publish;
                    let carried = carrier
                        .carry(topic, publish.qos, publish.retain, &publish.payload)
                        .await;
                    if let Err(error) = carried {
                        break Err(error);
                    }
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

/// Whether `topic` is one the relay carries in from the cloud: a device's replay
/// request, a Sparkplug NCMD or a host's STATE (what [`FILTERS`] match).
pub fn carried(topic: &str) -> bool {
    let levels: Vec<&str> = topic.split('/').collect();
    let named = |level: &&str| !level.is_empty() && !level.contains(['+', '#']);
    match levels.as_slice() {
        ["", "replay", device, "request"] => named(device),
        ["spBv1.0", "STATE", host] => named(host),
        ["spBv1.0", group, "NCMD", node] => named(group) && named(node) && *group != "STATE",
        _ => false,
    }
}

/// What carries requests in, whichever way they came (the cloud Mosquitto, NATS):
/// replay requests answered from the log, the rest passed on to the edge broker.
#[derive(Debug)]
pub struct Carrier {
    log: Log,
    edge: AsyncClient,
    replays: mpsc::Sender<Replay>,
    answered: Answered,
}

impl Carrier {
    pub fn new(log: Log, edge: AsyncClient, replays: mpsc::Sender<Replay>) -> Self {
        Self {
            log,
            edge,
            replays,
            answered: Answered::default(),
        }
    }

    /// Publishes `payload` on the edge broker as it came; an error is the edge
    /// connection closed.
    pub async fn publish(
        &self,
        topic: &str,
        qos: QoS,
        retain: bool,
        payload: &Bytes,
    ) -> anyhow::Result<()> {
        self.edge
            .publish(topic, qos, retain, payload.clone())
            .await
            .map_err(|_| anyhow::anyhow!("the edge connection closed"))
    }

    /// One request from the cloud: a replay request is answered from the log (the rest
    /// of it asked of the device), anything else goes on to the edge unchanged.
    pub async fn carry(
        &mut self,
        topic: &str,
        qos: QoS,
        retain: bool,
        payload: &Bytes,
    ) -> anyhow::Result<()> {
        let Some(device) = device_of_request(topic) else {
            return self.publish(topic, qos, retain, payload).await;
        };
        let (log, answered) = (&self.log, &mut self.answered);
        let mut request = match Ranges::parse(payload) {
            Ok(request) => request,
            Err(why) => {
                tracing::warn!(device, "replay request not carried: {why}");
                return Ok(());
            }
        };
        let now = Instant::now();
        let asked = request.ranges.len();
        request.ranges = answered.not_answered(device, &request.boot, &request.ranges, now);
        if request.ranges.is_empty() {
            tracing::info!(
                device,
                boot = request.boot,
                ranges = asked,
                "replay request not answered again: its ranges were answered from the log within {HOLD:?}"
            );
            metrics::counter!("iot_relay_replay_requests_held_total").increment(1);
            return Ok(());
        }
        let (owned_device, lookup, asked) = (device.to_string(), log.clone(), request.clone());
        let plan =
            tokio::task::spawn_blocking(move || plan(&lookup, &owned_device, &asked)).await??;
        let (from_log, to_device) = (plan.numbers.len(), plan.rest.len());
        let budget = answered.budget(device, now);
        let sent = send_answer(log, &plan.numbers, budget, &self.replays).await?;
        answered.spent(device, sent.bytes, now);
        answered.answered(device, &request.boot, &plan.numbers[..sent.readings], now);
        if sent.readings < from_log {
            tracing::warn!(
                device,
                sent = sent.readings,
                asked = from_log,
                "replay answer cut short: the device's budget of {} MiB a minute sent again from the log is spent; the rest waits for a later request",
                BUDGET_BYTES >> 20
            );
            metrics::counter!("iot_relay_replays_over_budget_total")
                .increment((from_log - sent.readings) as u64);
        }
        if !plan.rest.is_empty() {
            let rest = Ranges {
                boot: request.boot.clone(),
                ranges: plan.rest,
            };
            self.publish(
                &request_topic(device),
                QoS::AtLeastOnce,
                false,
                &Bytes::from(rest.encode()),
            )
            .await?;
        }
        tracing::info!(
            device,
            boot = request.boot,
            from_log = sent.readings,
            ranges_asked_of_device = to_device,
            "replay request answered"
        );
        Ok(())
    }
}

/// What an answer sent: readings, and their payload bytes.
#[derive(Debug, Default)]
struct Sent {
    readings: usize,
    bytes: u64,
}

/// Sends the kept readings `numbers` (`(seq, message number)`) from the log to the
/// cloud, a few at a time, while `budget` bytes last.
async fn send_answer(
    log: &Log,
    numbers: &[(u64, u64)],
    budget: u64,
    replays: &mpsc::Sender<Replay>,
) -> anyhow::Result<Sent> {
    let mut sent = Sent::default();
    while sent.readings < numbers.len() && sent.bytes < budget {
        let (lookup, chunk) = (log.clone(), numbers[sent.readings..].to_vec());
        let left = budget.saturating_sub(sent.bytes);
        let read =
            tokio::task::spawn_blocking(move || read_answer(&lookup, &chunk, left)).await??;
        for replay in read {
            sent.readings += 1;
            let Some(replay) = replay else {
                continue; // no longer kept
            };
            sent.bytes += replay.payload.len() as u64;
            if replays.send(replay).await.is_err() {
                return Ok(sent); // stopping
            }
        }
    }
    Ok(sent)
}

/// The next readings of `numbers` from the log, up to [`ANSWER_BYTES`] and `left` bytes
/// (but always one), one for each number: none for a reading no longer kept.
fn read_answer(
    log: &Log,
    numbers: &[(u64, u64)],
    left: u64,
) -> anyhow::Result<Vec<Option<Replay>>> {
    let mut read = Vec::new();
    let mut bytes = 0_u64;
    for &(_, number) in numbers {
        if !read.is_empty() && (bytes >= ANSWER_BYTES as u64 || bytes >= left) {
            break;
        }
        let replay = log.get(number)?.and_then(|entry| {
            Some(Replay {
                payload: mark_replay(&entry.payload)?,
                topic: entry.topic,
            })
        });
        bytes += replay
            .as_ref()
            .map_or(0, |replay| replay.payload.len() as u64);
        read.push(replay);
    }
    Ok(read)
}

/// A device and one of its boots.
type Series = (String, String);

/// Per device and boot, the ranges answered from the log lately; per device, the bytes
/// it may still have sent again (see the module header).
#[derive(Debug, Default)]
struct Answered {
    ranges: HashMap<Series, Vec<(u64, u64, Instant)>>,
    budgets: HashMap<String, (f64, Instant)>,
}

impl Answered {
    /// `ranges` without what was answered within [`HOLD`].
    fn not_answered(
        &mut self,
        device: &str,
        boot: &str,
        ranges: &[(u64, u64)],
        now: Instant,
    ) -> Vec<(u64, u64)> {
        let key = (device.to_string(), boot.to_string());
        let Some(held) = self.ranges.get_mut(&key) else {
            return ranges.to_vec();
        };
        held.retain(|&(_, _, at)| now.saturating_duration_since(at) < HOLD);
        let mut left = ranges.to_vec();
        for &(from, to, _) in held.iter() {
            left = left
                .into_iter()
                .flat_map(|(start, end)| without(start, end, from, to))
                .collect();
        }
        left
    }

    /// Remembers the seqs of `numbers` as answered.
    fn answered(&mut self, device: &str, boot: &str, numbers: &[(u64, u64)], now: Instant) {
        let Some(&(first, _)) = numbers.first() else {
            return;
        };
        if self.ranges.len() >= MAX_REMEMBERED {
            self.ranges.retain(|_, held| {
                held.iter()
                    .any(|&(_, _, at)| now.saturating_duration_since(at) < HOLD)
            });
        }
        if self.ranges.len() >= MAX_REMEMBERED {
            return;
        }
        let held = self
            .ranges
            .entry((device.to_string(), boot.to_string()))
            .or_default();
        // Runs of consecutive seqs, one range each.
        let mut start = first;
        let mut last = first;
        for &(seq, _) in &numbers[1..] {
            if seq != last + 1 {
                held.push((start, last, now));
                start = seq;
            }
            last = seq;
        }
        held.push((start, last, now));
        if held.len() > MAX_RANGES_REMEMBERED {
            let excess = held.len() - MAX_RANGES_REMEMBERED;
            held.drain(..excess);
        }
    }

    /// The bytes `device` may still have sent again now.
    fn budget(&mut self, device: &str, now: Instant) -> u64 {
        let (tokens, at) = self
            .budgets
            .entry(device.to_string())
            .or_insert((BUDGET_BYTES as f64, now));
        let refill = now.saturating_duration_since(*at).as_secs_f64() / 60.0 * BUDGET_BYTES as f64;
        *tokens = (*tokens + refill).min(BUDGET_BYTES as f64);
        *at = now;
        *tokens as u64
    }

    fn spent(&mut self, device: &str, bytes: u64, now: Instant) {
        if let Some((tokens, _)) = self.budgets.get_mut(device) {
            *tokens = (*tokens - bytes as f64).max(0.0);
        }
        if self.budgets.len() > MAX_REMEMBERED {
            // Full again after a minute: those idle longer are as good as new.
            self.budgets
                .retain(|_, (_, at)| now.saturating_duration_since(*at) < Duration::from_secs(60));
        }
    }
}

/// `start..=end` without `from..=to`: none, one or two ranges.
fn without(start: u64, end: u64, from: u64, to: u64) -> Vec<(u64, u64)> {
    if to < start || from > end {
        return vec![(start, end)];
    }
    let mut left = Vec::new();
    if from > start {
        left.push((start, from - 1));
    }
    if to < end {
        left.push((to + 1, end));
    }
    left
}

/// The device of a `/replay/<device>/request` topic.
fn device_of_request(topic: &str) -> Option<&str> {
    let device = topic.strip_prefix("/replay/")?.strip_suffix("/request")?;
    (!device.is_empty() && !device.contains('/')).then_some(device)
}

/// What the log answers to a request.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Kept readings to publish again, marked as replays: `(seq, message number)`.
    pub numbers: Vec<(u64, u64)>,
    /// Asked ranges the log does not have: for the device.
    pub rest: Vec<(u64, u64)>,
}

impl PartialEq for Replay {
    fn eq(&self, other: &Self) -> bool {
        self.topic == other.topic && self.payload == other.payload
    }
}

/// The log's answer to `request` for `device`, from its index alone: at most
/// [`MAX_PER_REQUEST`] readings (the cloud asks again for the rest; ranges past that
/// bound are neither answered nor passed on this time).
pub fn plan(log: &Log, device: &str, request: &Ranges) -> anyhow::Result<Plan> {
    let mut plan = Plan::default();
    let mut left = MAX_PER_REQUEST as usize;
    for &(from, to) in &request.ranges {
        if left == 0 {
            break;
        }
        let mut next = from;
        for (seq, number) in log.readings(device, &request.boot, (from, to), left)? {
            if seq > next {
                plan.rest.push((next, seq - 1));
            }
            next = next.max(seq + 1);
            plan.numbers.push((seq, number));
            left -= 1;
        }
        if left > 0 && next <= to {
            plan.rest.push((next, to));
        }
    }
    Ok(plan)
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
        let answer = answer_of(&log, "t-1", &request);
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

    /// What the log answers, read whole.
    #[derive(Debug)]
    struct Answer {
        replays: Vec<Replay>,
        rest: Vec<(u64, u64)>,
    }

    fn answer_of(log: &Log, device: &str, request: &Ranges) -> Answer {
        let plan = plan(log, device, request).expect("plan");
        let mut replays = Vec::new();
        let mut at = 0;
        while at < plan.numbers.len() {
            let read = read_answer(log, &plan.numbers[at..], u64::MAX).expect("read");
            at += read.len();
            replays.extend(read.into_iter().flatten());
        }
        Answer {
            replays,
            rest: plan.rest,
        }
    }

    #[test]
    fn an_answer_is_read_a_few_megabytes_at_a_time() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (log, _) = Log::open(dir.path()).expect("open");
        let big = |seq: u64| Entry {
            payload: format!(
                r#"{{"device":"t-1","boot":"b1","seq":{seq},"value":1.5,"pad":"{}"}}"#,
                "x".repeat(1 << 20)
            )
            .into_bytes()
            .into(),
            ..reading("/sensor/t-1/temperature", "t-1", seq)
        };
        log.append(&(1..=10).map(big).collect::<Vec<_>>())
            .expect("append");
        let request = Ranges {
            boot: "b1".into(),
            ranges: vec![(1, 10)],
        };
        let plan = plan(&log, "t-1", &request).expect("plan");
        assert_eq!(plan.numbers.len(), 10);
        let first = read_answer(&log, &plan.numbers, u64::MAX).expect("read");
        assert_eq!(first.len(), 4, "4 MiB at a time, the one past it included");
        let budgeted = read_answer(&log, &plan.numbers, 1).expect("read");
        assert_eq!(budgeted.len(), 1, "always one");
    }

    #[test]
    fn a_range_answered_is_not_answered_again_within_the_hold() {
        let mut answered = Answered::default();
        let now = Instant::now();
        answered.answered("d", "b1", &[(3, 30), (4, 31), (5, 32), (9, 40)], now);
        assert_eq!(
            answered.not_answered("d", "b1", &[(1, 10)], now),
            [(1, 2), (6, 8), (10, 10)]
        );
        assert_eq!(answered.not_answered("d", "b2", &[(1, 10)], now), [(1, 10)]);
        assert_eq!(answered.not_answered("e", "b1", &[(4, 4)], now), [(4, 4)]);
        let later = now + HOLD;
        assert_eq!(
            answered.not_answered("d", "b1", &[(1, 10)], later),
            [(1, 10)]
        );
    }

    #[test]
    fn a_device_has_its_budget_a_minute() {
        let mut answered = Answered::default();
        let now = Instant::now();
        assert_eq!(answered.budget("d", now), BUDGET_BYTES);
        answered.spent("d", BUDGET_BYTES, now);
        assert_eq!(answered.budget("d", now), 0);
        assert_eq!(answered.budget("e", now), BUDGET_BYTES);
        let half = answered.budget("d", now + Duration::from_secs(30));
        assert!(
            (BUDGET_BYTES / 2 - 1..=BUDGET_BYTES / 2).contains(&half),
            "{half}"
        );
    }

    #[test]
    fn only_requests_commands_and_states_are_carried() {
        for topic in [
            "/replay/t-1/request",
            "spBv1.0/plant/NCMD/node-1",
            "spBv1.0/STATE/scada",
        ] {
            assert!(carried(topic), "{topic}");
        }
        for topic in [
            "/replay/t-1/gone",
            "/replay//request",
            "/sensor/t-1/temperature",
            "spBv1.0/plant/NDATA/node-1",
            "spBv1.0/plant/DCMD/node-1/d",
            "spBv1.0/STATE/+",
            "spBv1.0/STATE/a/b",
            "spBv1.0/STATE/NCMD/x",
            "#",
        ] {
            assert!(!carried(topic), "{topic}");
        }
    }

    #[test]
    fn request_topics_name_one_device() {
        assert_eq!(device_of_request("/replay/t-1/request"), Some("t-1"));
        assert_eq!(device_of_request("/replay//request"), None);
        assert_eq!(device_of_request("/replay/a/b/request"), None);
        assert_eq!(device_of_request("spBv1.0/g/NCMD/n"), None);
    }
}
