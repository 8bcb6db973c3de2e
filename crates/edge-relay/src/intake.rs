//! The edge side: every message from the edge broker into the log, acknowledged to the
//! broker only once it is on disk.
//!
//! Group commit without a timer: while one batch is being synced, the next gathers what
//! arrives, and is written as soon as the first is done. A quiet edge costs one sync per
//! message; a busy one up to [`RECEIVE_MAXIMUM`] messages
//! per sync (the broker sends no more unacknowledged ones at once).
//!
//! Back-pressure: a batch is written only as far as the disk budget and the file system
//! have room for it ([`Room`], bytes, measured by the keeper once a second and counted
//! down here as batches are written, so that a fast stream cannot run past the budget
//! between two measurements). While there is no room (the budget, or the file system
//! less what the store needs for its own writes, is full of messages not forwarded yet),
//! nothing is written and nothing acknowledged; the broker holds what comes (in the
//! relay's session) and the devices their own buffers. Nothing is dropped (but what a
//! device account sends past its share or size limit, below). A batch the
//! disk refuses all the same is not acknowledged either: the relay opens its log again
//! (`crate::run`) and the broker sends the batch again.
//!
//! Device accounts ([`crate::accounts`]): a message larger than its account's limit, or
//! of an account that has its share of the log not forwarded yet, is refused as it
//! arrives: acknowledged at once and not written, counted and logged, so that it holds
//! back neither the batch nor the broker's window to the relay. The others go on.
//!
//! Each message into the log once, across reconnects: copies of an earlier connection
//! that the broker sends again are dropped before they are written, and a copy of one
//! written whose acknowledgement was lost with the connection (or with a relay killed
//! meanwhile) is known by [`Taken`], the last message written under each of the
//! broker's packet ids (kept in the log too: [`Log::edge_pkids`]), and acknowledged
//! without being written again.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use rumqttc::v5::mqttbytes::QoS;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::accounts::{self, Accounts};
use crate::log::{fingerprint, now_ms, Entry, Log};
use crate::mqtt5::{filter, Heard, Link, Message, RECEIVE_MAXIMUM};

/// Most messages held while a batch is written (or while the disk is full).
const MAX_PENDING: usize = 10_000;
/// Most payload bytes held so; what waits behind them the link bounds (its QoS 0
/// bounds, the receive maximum).
const MAX_PENDING_BYTES: usize = 64 << 20;

/// The room the keeper last measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    /// Bytes the log may still take: 0 while the disk budget or the file system is full
    /// of messages not forwarded yet.
    pub bytes: u64,
    /// Whether the file system, not `--max-disk`, is what limits it.
    pub file_system: bool,
}

impl Space {
    pub fn budget(bytes: u64) -> Self {
        Self {
            bytes,
            file_system: false,
        }
    }
}

/// The room in the log, as the keeper last measured it.
pub type Room = watch::Receiver<Space>;

/// What a message is counted as against the budget until the keeper measures again
/// ([`accounts::cost`]). Its journals have their room set aside by the keeper.
fn cost(message: &Message) -> u64 {
    accounts::cost(message.publish.topic.len(), message.publish.payload.len())
}

/// Most bytes of one batch (but always one message): the budget is measured between
/// batches, so that it is passed by no more than this when a batch overlaps the keeper's
/// measurement.
pub const MAX_BATCH_BYTES: u64 = 4 << 20;

/// How many messages of these `costs`, from the first, go into the next batch: as many
/// as fit in `room` bytes and [`MAX_BATCH_BYTES`]; and what they cost together.
fn fitting(costs: impl IntoIterator<Item = u64>, room: u64) -> (usize, u64) {
    let (mut count, mut spent) = (0, 0);
    for cost in costs {
        if spent + cost > room || (count > 0 && spent + cost > MAX_BATCH_BYTES) {
            break;
        }
        (count, spent) = (count + 1, spent + cost);
    }
    (count, spent)
}

/// Takes messages from `link` into `log` until `shutdown`; wakes `forward` after each
/// batch on disk. An error is a failed disk write or refused credentials.
pub async fn run(
    mut link: Link,
    log: Log,
    topics: Vec<String>,
    forward: Arc<Notify>,
    room: Room,
    accounts: Arc<Accounts>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut pending: Vec<Message> = Vec::new();
    let mut writing: Option<JoinHandle<anyhow::Result<Written>>> = None;
    let mut budget = Budget::new(room);
    let mut taken = Taken::read(&log).await?;
    // Payload bytes of `pending`.
    let mut held = 0;
    let result = loop {
        if writing.is_none() {
            held -= drop_resent(&link, &mut pending, &accounts);
            if let Some(batch) = budget.next_batch(&mut pending) {
                held -= batch.iter().map(|m| m.publish.payload.len()).sum::<usize>();
                let kept = |connection| link.session_kept_since(connection);
                let copies: Vec<bool> = batch.iter().map(|m| taken.has(kept, m)).collect();
                // Copies are not written again: not their account's backlog twice.
                let unwritten = batch.iter().zip(&copies).filter(|(_, copy)| **copy);
                unwritten.for_each(|(message, _)| unadmit(&accounts, message));
                writing = Some(write(&log, batch, copies));
            }
        }
        tokio::select! {
            biased;
            written = async {
                match writing.as_mut() {
                    Some(task) => task.await,
                    None => std::future::pending().await,
                }
            }, if writing.is_some() => {
                writing = None;
                // A batch the disk refused is not acknowledged: the broker sends it again
                // to whoever takes the session next.
                let written = match written.context("the log's writer failed").and_then(|batch| batch) {
                    Ok(written) => written,
                    Err(error) => break Err(error),
                };
                metrics::counter!("iot_relay_logged_total").increment(written.logged as u64);
                forward.notify_one();
                taken.remember(written.remembered, written.last);
                if let Err(error) = ack_all(&link, &written.batch).await {
                    break Err(error);
                }
            }
            () = shutdown.cancelled(), if writing.is_none() => break Ok(()),
            heard = link.recv(), if pending.len() < MAX_PENDING && held < MAX_PENDING_BYTES => match heard {
                Ok(Heard::Connected { session_present }) => {
                    if let Err(error) = connected(&mut taken, &log, &link, &topics, session_present).await {
                        break Err(error);
                    }
                }
                Ok(Heard::Message(message)) => {
                    if let Err(error) = taken.heard(&log, &message).await {
                        break Err(error);
                    }
                    let topic = String::from_utf8_lossy(&message.publish.topic);
                    if accounts.admit(&topic, message.publish.payload.len()).is_ok() {
                        held += message.publish.payload.len();
                        pending.push(*message);
                    } else if let Err(error) = link.ack(&message).await {
                        // Refused (too large, or its account past its share): acknowledged
                        // at once and not written, so that it holds back no one.
                        break Err(error);
                    }
                }
                Err(error) => break Err(error),
            },
            changed = budget.room.changed(), if budget.waiting => {
                if changed.is_err() {
                    break Ok(());
                }
                budget.spent = 0;
            }
        }
    };
    if !pending.is_empty() {
        tracing::info!(
            count = pending.len(),
            "stopping: messages not on disk yet are left to the edge broker (not acknowledged, sent again on the next start)"
        );
    }
    link.close().await;
    result
}

/// A new edge connection: what it says of the packet ids known ([`Taken::connected`]),
/// then the subscriptions.
async fn connected(
    taken: &mut Taken,
    log: &Log,
    link: &Link,
    topics: &[String],
    session_present: bool,
) -> anyhow::Result<()> {
    taken.connected(log, session_present).await?;
    let filters = topics.iter().map(|topic| filter(topic, QoS::AtLeastOnce));
    if link.client.subscribe_many(filters).await.is_err() {
        anyhow::bail!("the edge connection closed");
    }
    tracing::debug!(topics = ?topics, "subscribing on the edge broker");
    Ok(())
}

/// The disk budget as the intake sees it: the room the keeper last measured, less what
/// was written since.
struct Budget {
    room: Room,
    /// Bytes written since the keeper last measured the room.
    spent: u64,
    /// Whether the next batch waits for the keeper to measure the room again.
    waiting: bool,
    /// Whether the edge broker is being held back for want of room: what the keeper
    /// measured does not take the next message (not merely spent since).
    held_back: bool,
}

impl Budget {
    fn new(room: Room) -> Self {
        metrics::gauge!("iot_relay_back_pressure").set(0.0);
        Self {
            room,
            spent: 0,
            waiting: false,
            held_back: false,
        }
    }

    /// The first of `pending` as far as there is room for them, if any; says so when
    /// the edge broker is held back, and when no longer.
    fn next_batch(&mut self, pending: &mut Vec<Message>) -> Option<Vec<Message>> {
        if self.room.has_changed().unwrap_or(false) {
            self.room.borrow_and_update();
            self.spent = 0;
        }
        self.waiting = false;
        if pending.is_empty() {
            return None;
        }
        let space = *self.room.borrow();
        let room = space.bytes.saturating_sub(self.spent);
        let (fits, cost) = fitting(pending.iter().map(cost), room);
        if fits == 0 {
            self.waiting = true;
            // Room spent since the last measurement is no back-pressure: the keeper
            // measures again within a second.
            if !self.held_back && self.spent == 0 {
                if space.file_system {
                    tracing::warn!(
                        held = pending.len(),
                        "the file system of the log is nearly full (what is left is kept for the store's own writes): not acknowledging the edge broker until the cloud takes some and forwarded messages are deleted; the edge broker keeps what comes"
                    );
                } else {
                    tracing::warn!(
                        held = pending.len(),
                        "the log's disk budget is full of messages not forwarded yet: not acknowledging the edge broker until the cloud takes some"
                    );
                }
                metrics::gauge!("iot_relay_back_pressure").set(1.0);
                self.held_back = true;
            }
            return None;
        }
        if self.held_back {
            tracing::info!("room in the log again: acknowledging the edge broker");
            metrics::gauge!("iot_relay_back_pressure").set(0.0);
            self.held_back = false;
        }
        self.spent += cost;
        Some(pending.drain(..fits).collect())
    }
}

/// Drops from `pending` the messages the broker sends again (they came on a connection
/// that has since been replaced, with the session kept), so that the log takes each
/// once; returns their payload bytes.
fn drop_resent(link: &Link, pending: &mut Vec<Message>, accounts: &Accounts) -> usize {
    let before = pending.len();
    let mut bytes = 0;
    pending.retain(|message| {
        let again = link.comes_again(message);
        if again {
            bytes += message.publish.payload.len();
            unadmit(accounts, message);
        }
        !again
    });
    if pending.len() < before {
        tracing::debug!(
            count = before - pending.len(),
            "dropped messages of an earlier edge connection: the broker sends them again"
        );
    }
    bytes
}

/// `message`, admitted, is not written after all.
fn unadmit(accounts: &Accounts, message: &Message) {
    let topic = String::from_utf8_lossy(&message.publish.topic);
    accounts.unadmit(&topic, message.publish.payload.len());
}

async fn ack_all(link: &Link, batch: &[Message]) -> anyhow::Result<()> {
    for message in batch {
        link.ack(message).await?;
    }
    Ok(())
}

/// A batch on disk: the messages to acknowledge, how many of them the log took (not
/// counting copies it had), and what to remember of those.
struct Written {
    batch: Vec<Message>,
    logged: usize,
    remembered: Vec<(u16, Sent)>,
    /// The packet id of the last QoS 1/2 message the log took of it.
    last: Option<u16>,
}

/// Writes `batch` to the log in a blocking task, but for the messages `copies` marks
/// (the log has them already); gives it back once it is on disk.
fn write(log: &Log, batch: Vec<Message>, copies: Vec<bool>) -> JoinHandle<anyhow::Result<Written>> {
    let log = log.clone();
    tokio::task::spawn_blocking(move || {
        let received_ms = now_ms();
        let fresh = || {
            batch
                .iter()
                .zip(&copies)
                .filter(|(_, copy)| !**copy)
                .map(|(m, _)| m)
        };
        let entries: Vec<Entry> = fresh()
            .map(|message| Entry {
                topic: String::from_utf8_lossy(&message.publish.topic).into_owned(),
                payload: message.publish.payload.clone(),
                qos: match message.publish.qos {
                    QoS::AtMostOnce => rumqttc::QoS::AtMostOnce,
                    QoS::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
                    QoS::ExactlyOnce => rumqttc::QoS::ExactlyOnce,
                },
                retain: message.publish.retain,
                received_ms,
                edge_pkid: message.publish.pkid,
            })
            .collect();
        if !entries.is_empty() {
            // The store's journals within their part of the budget first.
            let waited = log.wait_for_journals()?;
            if waited > std::time::Duration::from_secs(5) {
                tracing::warn!(
                    ?waited,
                    "the log's journals were slow to be flushed: the batch waited for them"
                );
            }
            log.append(&entries)?;
        }
        // Copies too, as of this connection: their acknowledgement may be lost again.
        let remembered = batch.iter().filter_map(Sent::of).collect();
        let last = entries
            .iter()
            .rev()
            .find(|entry| entry.qos != rumqttc::QoS::AtMostOnce && entry.edge_pkid != 0)
            .map(|entry| entry.edge_pkid);
        let logged = entries.len();
        if logged < batch.len() {
            tracing::info!(
                count = batch.len() - logged,
                "acknowledging copies the edge broker sent again of messages the log has (their acknowledgement was lost with a connection)"
            );
        }
        Ok(Written {
            batch,
            logged,
            remembered,
            last,
        })
    })
}

/// What is remembered of a QoS 1/2 message written to the log, by its packet id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sent {
    /// The edge connection it came on (0: a run of the relay before this one).
    connection: u64,
    fingerprint: u64,
}

impl Sent {
    fn of(message: &Message) -> Option<(u16, Self)> {
        (message.publish.qos != QoS::AtMostOnce).then(|| {
            let sent = Self {
                connection: message.connection(),
                fingerprint: fingerprint(&message.publish.topic, &message.publish.payload),
            };
            (message.publish.pkid, sent)
        })
    }
}

/// The last message written under each of the edge broker's packet ids, by which a copy
/// the broker sends again (DUP set, the same packet id in the same session, the same
/// topic and payload) is known for one the log has: it is acknowledged, not written
/// twice. The broker gives a packet id to another message only once the one before is
/// acknowledged, so the last message under a packet id is the only one a copy can be
/// of, however many were written since (a window of the last messages written was not
/// enough: after a few kills in a row the broker sent again what had been written 4 222
/// messages before). At most 65 535 entries, some 3 MiB.
///
/// A packet id given again, to a message the log has not taken, whose topic and payload
/// are those of the last message under that id (a sensor that sends the same value on
/// one topic, 65 535 messages later), is not taken for a copy: Mosquitto gives its ids
/// in turn, so the broker's copies lie at most a few thousand ids behind the last one
/// taken, and a new message's id ahead of it. Only an id less than half the id space
/// behind the last one taken ([`COPIES_BEHIND`]) can be a copy's.
#[derive(Debug, Default)]
struct Taken {
    by_pkid: HashMap<u16, Sent>,
    /// The packet id of the last message taken in the session.
    last: Option<u16>,
    /// Whether this run had an edge connection before the current one.
    connected_before: bool,
}

/// How far behind the last packet id taken a copy's may be: half of the 65 535 ids.
const COPIES_BEHIND: u32 = 32_768;

/// How many ids `pkid` lies behind `last` in the broker's turn (1 to 65 535, 0 for the
/// same id).
fn behind(last: u16, pkid: u16) -> u32 {
    (u32::from(last) + 65_535 - u32::from(pkid)) % 65_535
}

/// The last messages of a log that has no map of packet ids yet (written by a relay
/// before it) taken as the map: the broker has at most [`RECEIVE_MAXIMUM`]
/// unacknowledged at once, and those the relay had written are among the last.
const LAST_OF_AN_OLDER_LOG: u64 = 2 * RECEIVE_MAXIMUM as u64;

impl Taken {
    /// What the log took before a restart, read off the runtime's threads: copies the
    /// broker sends again of those whose acknowledgements it had not read are known
    /// too.
    async fn read(log: &Log) -> anyhow::Result<Self> {
        let log = log.clone();
        tokio::task::spawn_blocking(move || Self::from_log(&log))
            .await
            .context("reading the log's edge packet ids failed")?
    }

    /// The log's map of packet ids ([`Log::edge_pkids`]), as of connection 0 (the
    /// relay's run before: they count while its first connection finds the session
    /// kept); for a log without one, its last [`LAST_OF_AN_OLDER_LOG`] messages, read a
    /// few at a time as their payloads may be large, and saved as its map.
    fn from_log(log: &Log) -> anyhow::Result<Self> {
        let before = |(pkid, fingerprint)| {
            let sent = Sent {
                connection: 0,
                fingerprint,
            };
            (pkid, sent)
        };
        if let Some(pkids) = log.edge_pkids() {
            return Ok(Self {
                by_pkid: pkids.known.into_iter().map(before).collect(),
                last: pkids.last,
                connected_before: false,
            });
        }
        let mut known = Vec::new();
        let mut from = log
            .next()
            .saturating_sub(LAST_OF_AN_OLDER_LOG)
            .max(log.first());
        loop {
            let read = log.read_from(from, 16, 16 << 20)?;
            let Some(&(last, _)) = read.last() else {
                break;
            };
            let sent = read
                .iter()
                .filter(|(_, entry)| entry.qos != rumqttc::QoS::AtMostOnce && entry.edge_pkid != 0);
            known.extend(sent.map(|(_, entry)| {
                (
                    entry.edge_pkid,
                    fingerprint(entry.topic.as_bytes(), &entry.payload),
                )
            }));
            from = last + 1;
        }
        let pkids = crate::log::EdgePkids {
            last: known.last().map(|&(pkid, _)| pkid),
            known,
        };
        log.save_edge_pkids(&pkids)?;
        Ok(Self {
            by_pkid: pkids.known.into_iter().map(before).collect(),
            last: pkids.last,
            connected_before: false,
        })
    }

    /// `written`, QoS 1/2 messages of a batch on disk (copies too, as of the
    /// connection they came on again); `last`, the packet id of the last the log took.
    fn remember(&mut self, written: Vec<(u16, Sent)>, last: Option<u16>) {
        self.by_pkid.extend(written);
        self.last = last.or(self.last);
    }

    /// A new edge connection (again: not the run's first): with the session lost, the
    /// packet ids known name nothing any more; kept, but the connection back within a
    /// run, the broker may have restarted from an older save, its ids going back: this
    /// run learns it from the next message given an id again ([`Taken::heard`]), a run
    /// after a kill could not ([`Taken::forget_on_disk`]).
    async fn connected(&mut self, log: &Log, session_present: bool) -> anyhow::Result<()> {
        let again = std::mem::replace(&mut self.connected_before, true);
        if !session_present {
            self.forget(log).await
        } else if again {
            Self::forget_on_disk(log).await
        } else {
            Ok(())
        }
    }

    /// A message from the broker: one given an id again ([`Taken::given_again`]) makes
    /// every id known name nothing.
    async fn heard(&mut self, log: &Log, message: &Message) -> anyhow::Result<()> {
        if !self.given_again(message) {
            return Ok(());
        }
        tracing::warn!(
            pkid = message.publish.pkid,
            "the edge broker gave a new message a packet id it had given one the log took since (its session restored from an older save, after a crash): the packet ids before are no longer taken for copies"
        );
        self.forget(log).await
    }

    /// The broker lost the session, or went back in it: its packet ids name nothing
    /// written, in the log too.
    async fn forget(&mut self, log: &Log) -> anyhow::Result<()> {
        self.by_pkid.clear();
        self.last = None;
        Self::forget_on_disk(log).await
    }

    /// The log's packet ids of what was written so far name nothing for a run of the
    /// relay after this one. The edge connection came back within a run: the broker may
    /// have restarted from its last save (Mosquitto saves every 30 s) and give ids again
    /// that the log took since, to other messages; a message so given, not written
    /// before a kill and sent again, was taken for a copy of the one the log had under
    /// that id when topic and payload were the same (500 of 500 lost). This run still
    /// knows them ([`Taken::given_again`] says when they are no longer to be trusted);
    /// after a kill, copies of what was written before are written again.
    async fn forget_on_disk(log: &Log) -> anyhow::Result<()> {
        let log = log.clone();
        tokio::task::spawn_blocking(move || log.new_edge_session())
            .await
            .context("writing the edge session failed")?
    }

    /// Whether `message`, new (no DUP), has a packet id the broker gave a message the
    /// log took since: Mosquitto gives its ids in turn, so a new message's id lies
    /// ahead of the last one taken unless the broker went back in its session (restored
    /// from an older save after a crash).
    fn given_again(&self, message: &Message) -> bool {
        let pkid = message.publish.pkid;
        !message.publish.dup
            && message.publish.qos != QoS::AtMostOnce
            && self.by_pkid.contains_key(&pkid)
            && self
                .last
                .is_some_and(|last| behind(last, pkid) < COPIES_BEHIND)
    }

    /// Whether `message` is a copy of one written; `kept` says whether a connection is
    /// of the broker's current session ([`Link::session_kept_since`]).
    fn has(&self, kept: impl Fn(u64) -> bool, message: &Message) -> bool {
        if !message.publish.dup
            || message.publish.qos == QoS::AtMostOnce
            || !kept(message.connection())
        {
            return false;
        }
        let pkid = message.publish.pkid;
        if self
            .last
            .is_none_or(|last| behind(last, pkid) >= COPIES_BEHIND)
        {
            return false;
        }
        let print = fingerprint(&message.publish.topic, &message.publish.payload);
        self.by_pkid
            .get(&pkid)
            .is_some_and(|sent| kept(sent.connection) && sent.fingerprint == print)
    }
}

#[cfg(test)]
mod tests {
    use rumqttc::v5::mqttbytes::v5::Publish;
    use rumqttc::v5::mqttbytes::QoS;

    use super::{fitting, Message, Sent, Taken, MAX_BATCH_BYTES};

    fn message(pkid: u16, payload: &str, dup: bool, connection: u64) -> Message {
        let mut publish = Publish::new(
            "/sensor/plain-1/temperature",
            QoS::AtLeastOnce,
            payload.to_owned(),
            None,
        );
        publish.pkid = pkid;
        publish.dup = dup;
        Message::new(publish, connection)
    }

    fn entry(pkid: u16, payload: &str) -> crate::log::Entry {
        crate::log::Entry {
            topic: "/sensor/plain-1/temperature".into(),
            payload: payload.to_owned().into(),
            qos: rumqttc::QoS::AtLeastOnce,
            retain: false,
            received_ms: 0,
            edge_pkid: pkid,
        }
    }

    #[test]
    fn a_copy_of_a_message_written_is_known_by_packet_id_session_and_content() {
        let mut taken = Taken::default();
        taken.remember(
            vec![Sent::of(&message(7, "21.5", false, 1)).expect("QoS 1")],
            Some(7),
        );
        let kept = |_| true;
        assert!(
            taken.has(kept, &message(7, "21.5", true, 2)),
            "the broker's copy"
        );
        assert!(
            !taken.has(kept, &message(7, "21.5", false, 2)),
            "a first delivery"
        );
        assert!(
            !taken.has(kept, &message(8, "21.5", true, 2)),
            "another packet id"
        );
        assert!(
            !taken.has(kept, &message(7, "21.6", true, 2)),
            "another payload"
        );
        // A session lost since (the broker's packet ids start again): no copy.
        let lost_at_2 = |connection| connection >= 2;
        assert!(!taken.has(lost_at_2, &message(7, "21.5", true, 2)));
    }

    /// The broker sent again, after a few kills, what had been written 4 222 messages
    /// before: a copy is known however many were written since, and a packet id names
    /// only the last message written under it.
    #[test]
    fn a_copy_is_known_however_many_messages_were_written_since() {
        let mut taken = Taken::default();
        let written = (0..200_000u32).map(|i| {
            let pkid = u16::try_from(i % 65_535 + 1).expect("packet id");
            Sent::of(&message(pkid, &i.to_string(), false, 1)).expect("QoS 1")
        });
        taken.remember(written.collect(), Some(3395));
        assert!(taken.by_pkid.len() <= 65_535);
        // Packet id 1 was given last to message 196 605 (3 × 65 535).
        assert!(taken.has(|_| true, &message(1, "196605", true, 2)));
        assert!(
            !taken.has(|_| true, &message(1, "131070", true, 2)),
            "an earlier message under the same packet id, acknowledged before it was given again"
        );
    }

    /// A sensor that sends one value on one topic: 65 535 messages later its message
    /// has the id, topic and payload of the last one under that id. Sent again after a
    /// kill before the log took it, it is a new message, ahead of the last id taken.
    #[test]
    fn an_id_given_again_to_the_same_message_is_no_copy() {
        let mut taken = Taken::default();
        let written = (1..=65_535u16).map(|pkid| Sent::of(&message(pkid, "closed", false, 1)));
        taken.remember(
            written.map(|sent| sent.expect("QoS 1")).collect(),
            Some(65_535),
        );
        assert!(
            !taken.has(|_| true, &message(1, "closed", true, 2)),
            "the next id, given again"
        );
        assert!(taken.has(|_| true, &message(65_000, "closed", true, 2)));
        assert!(
            !taken.has(|_| true, &message(30_000, "closed", true, 2)),
            "too far behind"
        );
    }

    /// The edge broker crashed and came back from its last save: it gives new messages
    /// ids the log took since. The first such message says so, and the ids before are
    /// no longer taken for copies (500 of 500 messages were lost so, each sent again
    /// after a kill with the topic and payload of the one the log had under its id).
    #[tokio::test]
    async fn a_broker_that_went_back_in_its_session_is_no_longer_trusted() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (log, _) = crate::log::Log::open(dir.path()).expect("open");
        let mut taken = Taken::default();
        let written = (1..=3000u16).map(|pkid| Sent::of(&message(pkid, "21.5", false, 1)));
        taken.remember(
            written.map(|sent| sent.expect("QoS 1")).collect(),
            Some(3000),
        );
        assert!(
            !taken.given_again(&message(3001, "21.5", false, 2)),
            "the next id"
        );
        assert!(!taken.given_again(&message(100, "21.5", true, 2)), "a copy");
        assert!(taken.given_again(&message(100, "21.5", false, 2)));
        taken.forget(&log).await.expect("forget");
        assert!(!taken.has(|_| true, &message(101, "21.5", true, 2)));
    }

    /// The edge connection came back within a run: what the log took before names
    /// nothing for the next run (the broker may have gone back to an older save), while
    /// this run still knows it.
    #[tokio::test]
    async fn ids_before_a_reconnect_are_not_trusted_after_a_restart() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let (log, _) = crate::log::Log::open(dir.path()).expect("open");
            log.append(&[entry(7, "21.5")]).expect("append");
            Taken::forget_on_disk(&log).await.expect("forget on disk");
            log.append(&[entry(8, "21.6")]).expect("append");
        }
        let (log, _) = crate::log::Log::open(dir.path()).expect("open again");
        let taken = Taken::from_log(&log).expect("read");
        assert!(!taken.has(|_| true, &message(7, "21.5", true, 1)));
        assert!(taken.has(|_| true, &message(8, "21.6", true, 1)));
    }

    #[test]
    fn a_relay_started_again_knows_copies_of_all_its_log_took() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let (log, _) = crate::log::Log::open(dir.path()).expect("open");
            // Every id once, then the first ten again.
            let batch: Vec<_> = (1..=65_535u16)
                .map(|pkid| entry(pkid, &pkid.to_string()))
                .collect();
            log.append(&batch).expect("append");
            let again: Vec<_> = (1..=10u16)
                .map(|pkid| entry(pkid, &format!("again {pkid}")))
                .collect();
            log.append(&again).expect("append");
        }
        let (log, _) = crate::log::Log::open(dir.path()).expect("open again");
        let taken = Taken::from_log(&log).expect("read");
        let session_kept = |_| true;
        assert!(taken.has(session_kept, &message(10, "again 10", true, 1)));
        assert!(
            !taken.has(session_kept, &message(9, "9", true, 1)),
            "replaced"
        );
        // 5 545 messages back: past any window of the last 2 000 written.
        assert!(taken.has(session_kept, &message(60_000, "60000", true, 1)));
        assert!(!taken.has(session_kept, &message(60_000, "60001", true, 1)));
        // The first connection found the session gone: the broker's ids start again.
        let lost_at_1 = |connection| connection >= 1;
        assert!(!taken.has(lost_at_1, &message(10, "again 10", true, 1)));
    }

    #[tokio::test]
    async fn a_session_the_broker_lost_is_forgotten_across_a_restart() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let (log, _) = crate::log::Log::open(dir.path()).expect("open");
            log.append(&[entry(3, "21.5")]).expect("append");
            let mut taken = Taken::from_log(&log).expect("read");
            taken.forget(&log).await.expect("forget");
            assert!(!taken.has(|_| true, &message(3, "21.5", true, 2)));
            log.append(&[entry(4, "21.6")]).expect("append");
        }
        let (log, _) = crate::log::Log::open(dir.path()).expect("open again");
        let taken = Taken::from_log(&log).expect("read");
        assert!(
            !taken.has(|_| true, &message(3, "21.5", true, 1)),
            "a packet id of the lost session"
        );
        assert!(taken.has(|_| true, &message(4, "21.6", true, 1)));
    }

    #[test]
    fn a_batch_is_written_as_far_as_the_room_goes() {
        assert_eq!(fitting([100, 100, 100], 1000), (3, 300));
        assert_eq!(fitting([100, 100, 100], 250), (2, 200));
        assert_eq!(fitting([100, 100, 100], 200), (2, 200));
        // The first message bigger than the room holds the whole batch back, and those
        // behind it keep their order.
        assert_eq!(fitting([300, 10], 250), (0, 0));
        assert_eq!(fitting([100, 100], 0), (0, 0));
        assert_eq!(fitting([], 0), (0, 0));
        // A batch ends at its byte bound, but one message always goes.
        let half = MAX_BATCH_BYTES / 2;
        assert_eq!(fitting([half, half, 1], u64::MAX), (2, MAX_BATCH_BYTES));
        let big = MAX_BATCH_BYTES + 1;
        assert_eq!(fitting([big, 1], u64::MAX), (1, big));
    }
}
