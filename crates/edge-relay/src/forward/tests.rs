//! The forwarder's bookkeeping without a broker: packet ids, and the order of the
//! forwarded mark, its sync and the releases.

use std::collections::HashSet;
use std::time::Duration;

use iot_core::config::BrokerSettings;
use rumqttc::{Packet, PubComp, Publish, QoS};

use super::*;
use crate::cloud::{Cloud, Heard};

/// A forwarder on a new log in `dir`, with a connection that is never made.
fn forwarder(dir: &std::path::Path) -> Forwarder {
    let (log, _) = Log::open(dir).expect("a log");
    forwarder_on(log)
}

/// A forwarder starting on `log`, as after a restart.
fn forwarder_on(log: Log) -> Forwarder {
    let broker = BrokerSettings {
        host: "127.0.0.1".into(),
        port: 9,
        username: None,
        password: None,
        tls_ca: None,
        keep_alive: Duration::from_secs(30),
        env_prefix: "CLOUD",
    };
    let options = broker.mqtt_options("test", false).expect("options");
    let cloud = Cloud::new(&broker, options, false);
    let (_, replays) = mpsc::channel(1);
    let refill = (Duration::from_secs(120), Duration::from_secs(30));
    let accounts = Arc::new(crate::accounts::Accounts::new(None, 256 << 10, 32 << 20));
    Forwarder::new(
        cloud,
        log,
        accounts,
        Arc::new(Notify::new()),
        replays,
        refill,
    )
}

/// Puts messages `numbers` in flight, as `fill` does.
fn send(forwarder: &mut Forwarder, numbers: std::ops::Range<u64>) {
    for number in numbers {
        let mut publish = Publish::new("/t", QoS::ExactlyOnce, number.to_string());
        publish.pkid = message_pid(number);
        forwarder.push(number, Stage::Sent, Some(publish));
        forwarder.cursor = number + 1;
    }
}

fn stages(forwarder: &Forwarder) -> Vec<(u64, Stage)> {
    forwarder
        .slots
        .iter()
        .map(|slot| (slot.number, slot.stage))
        .collect()
}

#[test]
fn packet_ids_of_the_log_cycle_and_stay_apart_from_the_replays() {
    assert_eq!(message_pid(0), 1);
    assert_eq!(message_pid(1), 2);
    assert_eq!(message_pid(u64::from(MESSAGE_PIDS) - 1), MESSAGE_PIDS);
    assert_eq!(message_pid(u64::from(MESSAGE_PIDS)), 1);
    assert!(message_pid(u64::MAX) <= MESSAGE_PIDS);
    const { assert!(FIRST_REPLAY_PID > MESSAGE_PIDS) };
    // What the broker may hold after a crash (SPAN below the mark and SPAN from it on)
    // never shares an id, wherever the mark is.
    let cycle = u64::from(MESSAGE_PIDS);
    for mark in [
        SPAN,
        12_345,
        cycle - SPAN,
        cycle,
        7 * cycle + 1,
        u64::MAX / 2,
    ] {
        let ids: HashSet<u16> = (mark - SPAN..mark + SPAN).map(message_pid).collect();
        assert_eq!(ids.len() as u64, 2 * SPAN, "around {mark}");
    }
}

#[tokio::test]
async fn a_message_is_released_only_once_a_mark_on_disk_covers_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut forwarder = forwarder(dir.path());
    // Across the end of the ids' cycle: 59 998 .. 60 002 have ids 59 999, 60 000, 1, 2, 3.
    let first = u64::from(MESSAGE_PIDS) - 2;
    forwarder.cursor = first;
    send(&mut forwarder, first..first + 5);
    assert_eq!(forwarder.find(1), Some(2));
    assert_eq!(forwarder.find(4), None);

    // PUBRECs out of order: the mark goes only as far as all before it were received.
    for number in [first + 1, first + 3] {
        forwarder.received_by_broker(message_pid(number)).await;
    }
    forwarder.settle();
    assert_eq!(forwarder.mark, first);
    forwarder.received_by_broker(message_pid(first)).await;
    forwarder.settle();
    assert_eq!(forwarder.mark, first + 2);
    use Stage::{Received, Released, Sent};
    // Received is not released: nothing before a sync says so.
    assert_eq!(
        stages(&forwarder),
        [
            (first, Received),
            (first + 1, Received),
            (first + 2, Sent),
            (first + 3, Received),
            (first + 4, Sent)
        ]
    );

    // A sync of an earlier mark releases only what that mark covered.
    forwarder.synced(first + 1).await.expect("released");
    assert_eq!(forwarder.durable, first + 1);
    assert_eq!(forwarder.slots[0].stage, Released);
    assert_eq!(forwarder.slots[1].stage, Received);
    assert!(forwarder.slots[0].publish.is_none(), "let go once released");
    assert!(forwarder.slots[1].publish.is_some(), "kept until released");
    forwarder.synced(first + 2).await.expect("released");
    assert_eq!(forwarder.slots[1].stage, Released);
    assert_eq!(
        forwarder.slots[3].stage, Received,
        "beyond the mark on disk"
    );

    // PUBCOMP of the second first: the first still holds the front.
    let comp = |number| Heard::Packet(Packet::PubComp(PubComp::new(message_pid(number))));
    forwarder.heard(comp(first + 1)).await.expect("heard");
    assert_eq!(forwarder.slots.len(), 5);
    forwarder.heard(comp(first)).await.expect("heard");
    assert_eq!(
        stages(&forwarder),
        [(first + 2, Sent), (first + 3, Received), (first + 4, Sent)]
    );
    assert_eq!(forwarder.in_flight(), 3);
}

#[tokio::test]
async fn a_run_after_a_crash_releases_what_the_last_may_have_left_and_sends_the_rest_under_the_same_ids(
) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mark = 5_000;
    let log = forwarder(dir.path()).log;
    // What the last run left on disk: the forwarded mark.
    log.mark_forwarded(mark).expect("mark");
    log.sync().expect("sync");
    let mut forwarder = forwarder_on(log.clone());
    assert_eq!((forwarder.durable, forwarder.cursor), (mark, mark));
    forwarder
        .heard(Heard::Connected {
            session_present: true,
        })
        .await
        .expect("resumed");
    // PUBRELs for the SPAN below the mark, waited for before anything new goes out.
    let numbers: Vec<u64> = forwarder.slots.iter().map(|slot| slot.number).collect();
    assert_eq!(numbers, (mark - SPAN..mark).collect::<Vec<_>>());
    assert!(forwarder
        .slots
        .iter()
        .all(|slot| slot.stage == Stage::Released && slot.resumed));
    assert!(!forwarder.has_room());
    // The first message sent again has the id it had in the last run.
    assert_eq!(message_pid(forwarder.cursor), message_pid(mark));

    // Without the session, the broker holds nothing: no PUBRELs wait; it lost its state,
    // so what was forwarded is sent again after the refill delay.
    let mut fresh = forwarder_on(log);
    fresh
        .heard(Heard::Connected {
            session_present: false,
        })
        .await
        .expect("connected");
    assert!(fresh.slots.is_empty());
    assert!(fresh.paused_until.is_some());
}

#[tokio::test]
async fn what_is_sent_again_below_the_mark_on_disk_is_released_without_another_sync() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut forwarder = forwarder(dir.path());
    // A refill: the cloud lost its state, and what it had is sent again from before the
    // mark, which is on disk already and does not move for these.
    forwarder.log.mark_forwarded(100).expect("mark");
    (forwarder.mark, forwarder.durable) = (100, 100);
    forwarder.cursor = 50;
    send(&mut forwarder, 50..53);
    let rec = Heard::Packet(Packet::PubRec(rumqttc::PubRec::new(message_pid(51))));
    forwarder.heard(rec).await.expect("heard");
    assert_eq!(
        stages(&forwarder),
        [(50, Stage::Sent), (51, Stage::Released), (52, Stage::Sent)]
    );
    assert!(forwarder.syncing.is_none(), "no sync needed");
}
