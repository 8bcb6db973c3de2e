//! `edge-relay` between the project's two brokers (set up with `EDGE_FORWARDER=relay`),
//! with the persister and a real MongoDB-wire server behind: what crosses it arrives
//! unchanged (topic, payload, retain flag), and a cloud outage waits in the relay's log,
//! through a SIGKILL of the relay, to be stored once when the cloud is back; a relay
//! SIGKILLed mid-stream loses nothing, and SIGKILLed again and again forwards nothing
//! twice (plain values included), by what the cloud broker does with QoS 2.

use std::path::Path;
use std::time::Duration;

use bson::{doc, Document};
use futures_util::TryStreamExt;
use rumqttc::QoS;
use tests::stored::{assert_exactly_once, start_sensor, stored_seqs, wait_for_readings};
use tests::{
    free_port, prometheus, spawn_mongo, spawn_relay_brokers, wait_for, Brokers, Service, TestClient,
};

/// Time allowed for a backlog to drain after an outage (the reconnect backoff grows
/// during it, up to 30 s).
const CATCH_UP: Duration = Duration::from_secs(90);

/// A `temperature-sensor` on the edge broker at `port` publishing `count` keyed
/// readings of `device` at QoS 1, at most 1000 a second (so that a crash falls within
/// the stream).
fn start_paced_sensor(brokers: &Brokers, port: u16, device: &str, count: &str) -> Service {
    start_sensor_every(brokers, port, device, count, "0.001")
}

/// As [`start_paced_sensor`], one reading every `interval` seconds at most.
fn start_sensor_every(
    brokers: &Brokers,
    port: u16,
    device: &str,
    count: &str,
    interval: &str,
) -> Service {
    let mut args = tests::stored::sensor_args(device, count);
    let at = args
        .iter()
        .position(|arg| arg == "--interval")
        .expect("interval")
        + 1;
    args[at] = interval.into();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    tests::spawn_service(
        "temperature-sensor",
        brokers.dir(),
        port,
        Some("temperature-sensor"),
        &args,
    )
}

/// One value of the relay's metrics on `port`.
async fn metric(port: u16, name: &str) -> Option<f64> {
    let (_, body) = prometheus::get(port, "/metrics").await;
    prometheus::sample(&body, name)
}

/// [`Brokers::relay_with_metrics`], as the tests here call it.
async fn relay_with_metrics(brokers: &Brokers, log_dir: &Path, args: &[&str]) -> (Service, u16) {
    brokers.relay_with_metrics(log_dir, args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_crosses_the_relay_arrives_unchanged_and_a_cloud_outage_waits_on_its_disk() {
    let (mut brokers, mongo) = (spawn_relay_brokers().await, spawn_mongo().await);
    let log_dir = brokers.dir().join("relay-log");
    let (mut relay, metrics_port) =
        relay_with_metrics(&brokers, &log_dir, &["--site", "plant-1"]).await;
    let mut persister = brokers.persister_ready(&mongo, &[]).await;

    // The seed's form: a plain value, retained, QoS 0. It is retained on the cloud too.
    let mut seed = brokers.start_edge("temperature-sensor", &["--count", "1"]);
    seed.expect_success().await;
    let db = mongo.database().await;
    wait_for_readings(&db, doc! { "topic": "/sensor/temperature" }, 1).await;
    let retained = TestClient::retained(brokers.cloud.port, "/sensor/temperature").await;
    assert!(retained.retain);
    let value: f64 = std::str::from_utf8(&retained.payload)
        .expect("text")
        .parse()
        .expect("the plain value, unchanged");
    assert!((20.0..=30.0).contains(&value), "{value}");

    // Live: 2000 keyed readings, each stored once.
    start_sensor(&brokers, "relay-1", "2000")
        .expect_success()
        .await;
    wait_for_readings(&db, doc! { "device": "relay-1" }, 2000).await;

    // The cloud down: 3000 readings wait in the relay's log, acknowledged to the edge.
    brokers.cloud.stop().await;
    start_sensor(&brokers, "relay-2", "3000")
        .expect_success()
        .await;
    wait_for(
        "a backlog of 3000 in the relay's log",
        || metric(metrics_port, "iot_relay_backlog"),
        |backlog| *backlog == Some(3000.0),
    )
    .await;
    // The relay SIGKILLed with its backlog, and started again.
    relay.kill().await;
    let mut relay = brokers.start_relay(&log_dir, &["--site", "plant-1"]);
    relay.wait_for_log("subscribed on the edge broker").await;
    assert!(brokers.cloud.start().await, "{}", brokers.cloud.log());
    tests::wait_for_within(
        CATCH_UP,
        "the backlog stored",
        || tests::stored::count(&db, doc! { "device": "relay-2" }),
        |n| *n == 3000,
    )
    .await;

    for (device, count) in [("relay-1", 2000), ("relay-2", 3000)] {
        assert_exactly_once(&stored_seqs(&db, device).await, count);
    }
    relay.stop_cleanly().await;
    persister.stop_cleanly().await;
}

/// The relay SIGKILLed twice while a device publishes, and started again each time:
/// every reading is stored once. The persister asks no device for gaps (`--no-repair`),
/// so nothing but the relay's own log and the edge broker's session carries them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_stream_loses_nothing_and_stores_nothing_twice() {
    let (brokers, mongo) = (spawn_relay_brokers().await, spawn_mongo().await);
    let log_dir = brokers.dir().join("relay-log");
    let (mut relay, mut port) = relay_with_metrics(&brokers, &log_dir, &[]).await;
    let mut persister = brokers.persister_ready(&mongo, &["--no-repair"]).await;
    let db = mongo.database().await;

    // As fast as the relay takes them: many messages between the broker and the disk.
    // Long enough that both kills fall within it (20 000 ended before the second kill
    // once the sensor wrote its publishes in batches).
    let mut sensor = start_sensor(&brokers, "crash-1", "40000");
    // Each kill while the relay is still taking the stream: what it has not taken waits
    // in its session on the edge broker (the sensor itself may be done by then: the
    // broker takes it faster than the relay).
    let mut taken = 0.0;
    for _ in 0..2 {
        let logged = wait_for(
            "2000 messages logged by this relay",
            || metric(port, "iot_relay_logged_total"),
            |logged| logged.is_some_and(|logged| logged >= 2000.0),
        )
        .await;
        taken += logged.unwrap_or(0.0);
        assert!(
            taken < 40000.0,
            "the relay had taken the whole stream before the kill"
        );
        relay.kill().await;
        (relay, port) = relay_with_metrics(&brokers, &log_dir, &[]).await;
    }
    sensor.expect_success().await;
    // Beside this file's other tests the persister stored 36 030 of them in 90 s; on a
    // machine loaded further, 36 246 in 180 s: waited for as long as the count moves.
    tests::wait_while_it_moves(
        "every reading stored",
        (CATCH_UP, 6 * CATCH_UP),
        || tests::stored::count(&db, doc! { "device": "crash-1" }),
        |n| n >= 40_000,
    )
    .await;
    assert_exactly_once(&stored_seqs(&db, "crash-1").await, 40_000);
    relay.stop_cleanly().await;
    persister.stop_cleanly().await;
}

/// The relay SIGKILLed 15 times while it forwards a stream of plain values (about 500 a
/// second, which the persister cannot tell apart: a payload that is just a number) and
/// a keyed JSON stream beside it: every plain value 1..=N is stored exactly once, none
/// missing and none twice, and so is every keyed reading. The relay forwards at QoS 2
/// and makes its forwarded mark durable before it releases what the cloud received, so
/// what it sends again after a crash is what the cloud broker holds unreleased, and
/// takes as the duplicate it is.
// One scenario read top to bottom, with what it says of the hop at fault when it fails.
#[allow(clippy::too_many_lines)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_again_and_again_forwards_nothing_twice() {
    const KILLS: usize = 15;
    const COUNT: u32 = 20_000;
    const EVERY: Duration = Duration::from_millis(2);
    let (brokers, mongo) = (spawn_relay_brokers().await, spawn_mongo().await);
    let log_dir = brokers.dir().join("relay-log");
    let (mut relay, mut port) = relay_with_metrics(&brokers, &log_dir, &[]).await;
    let mut persister = brokers.persister_ready(&mongo, &["--no-repair"]).await;
    let db = mongo.database().await;

    // Which hop sends a plain value twice, should one be stored twice: what the edge
    // broker delivers to a subscriber of its own beside the relay (the device's client
    // sends again what its broker had not acknowledged when its connection drops: those
    // are the device's copies, which no one after it can tell apart), and what the cloud
    // broker delivers to one beside the persister.
    let (stop_watching, watched) = watch_cloud(brokers.cloud.port, UNKEYED_TOPIC).await;
    let (stop_watching_edge, watched_edge) = watch_cloud(brokers.local.port, UNKEYED_TOPIC).await;
    let plain = publish_unkeyed_every(brokers.local.port, COUNT, EVERY);
    let mut sensor = start_sensor_every(
        &brokers,
        brokers.local.port,
        "again-1",
        &COUNT.to_string(),
        "0.002",
    );
    let mut runs_said = Vec::new();
    for kill in 0..KILLS {
        // Each kill with this relay forwarding (a few hundred acknowledged by the cloud,
        // more at each kill so that they fall at different points of the window), and
        // while the plain values still come.
        let at = 300.0 + 40.0 * kill as f64;
        wait_for(
            "messages forwarded by this relay",
            || metric(port, "iot_relay_forwarded_total"),
            |forwarded| forwarded.is_some_and(|forwarded| forwarded >= at),
        )
        .await;
        assert!(
            !plain.is_finished(),
            "the plain values ended before kill {}",
            kill + 1
        );
        relay.kill().await;
        // What each run said of the edge broker's copies, for a failure's message.
        runs_said.push(
            relay
                .stderr()
                .lines()
                .filter(|line| line.contains("copies") || line.contains("link=\"edge\""))
                .map(str::to_string)
                .collect::<Vec<_>>()
                .join("\n"),
        );
        (relay, port) = relay_with_metrics(&brokers, &log_dir, &[]).await;
    }
    plain.await.expect("the plain values published");
    sensor.expect_success().await;

    let (distinct, _) = tests::wait_for_within(
        CATCH_UP,
        "every plain value stored",
        || unkeyed_stored(&db, COUNT),
        |(distinct, _)| *distinct == COUNT as usize,
    )
    .await;
    tests::wait_for_within(
        CATCH_UP,
        "every keyed reading stored",
        || tests::stored::count(&db, doc! { "device": "again-1" }),
        |n| *n >= u64::from(COUNT),
    )
    .await;
    // What was in flight at the last kill has arrived by now: the relay forwarded its
    // whole log.
    wait_for(
        "the relay's backlog forwarded",
        || metric(port, "iot_relay_backlog"),
        |backlog| *backlog == Some(0.0),
    )
    .await;
    let (_, stored_at_end) = unkeyed_stored(&db, COUNT).await;
    eprintln!(
        "{KILLS} kills: {COUNT} plain values, {distinct} stored, {} stored twice",
        stored_at_end - distinct
    );
    let _ = stop_watching.send(());
    let _ = stop_watching_edge.send(());
    let delivered = watched.await.expect("the cloud watcher");
    let at_edge = watched_edge.await.expect("the edge watcher");
    let twice_by_cloud = delivered.values().filter(|n| **n > 1).count();
    let twice_at_edge = at_edge.values().filter(|n| **n > 1).count();
    // Copies the device sent (its client's own resends): stored twice by right.
    let device_copies: usize = at_edge.values().map(|n| n - 1).sum();
    eprintln!(
        "the cloud broker delivered {} plain values to a subscriber of its own, {twice_by_cloud} of them more than once; the edge broker {}, {twice_at_edge} more than once (the device's client sent them again)",
        delivered.len(),
        at_edge.len()
    );
    relay.stop_cleanly().await;
    persister.stop_cleanly().await;
    if stored_at_end > distinct + device_copies {
        say_who_sent_again(&persister, &brokers, &relay);
        let in_log = payloads_logged_twice(&log_dir, UNKEYED_TOPIC);
        eprintln!("plain values the relay's log holds more than once: {in_log}");
        for (run, said) in runs_said.iter().enumerate() {
            eprintln!("relay run {}:\n{said}", run + 1);
        }
    }
    assert_eq!(
        (distinct, stored_at_end),
        (COUNT as usize, COUNT as usize + device_copies),
        "plain values stored more than once (beyond the {device_copies} copies the device sent)"
    );
    assert_eq!(
        twice_by_cloud, twice_at_edge,
        "the cloud broker delivered plain values twice that the edge broker delivered once"
    );
    assert_exactly_once(&stored_seqs(&db, "again-1").await, i64::from(COUNT));
}

/// A subscriber of the cloud broker's own on `topic` (QoS 1, clean session) counting
/// each payload it is delivered, until told to stop (or 20 s pass without one).
async fn watch_cloud(
    port: u16,
    topic: &str,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<std::collections::HashMap<String, usize>>,
) {
    let mut client = TestClient::connect(port, "mqtt-subscriber").await;
    client.subscribe(topic).await;
    let (stop, mut stopped) = tokio::sync::oneshot::channel();
    let watched = tokio::spawn(async move {
        let mut delivered = std::collections::HashMap::new();
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                message = client.next_message() => {
                    let payload = String::from_utf8_lossy(&message.payload).into_owned();
                    *delivered.entry(payload).or_insert(0) += 1;
                }
            }
        }
        delivered
    });
    (stop, watched)
}

/// How many payloads of `topic` the relay's log in `dir` (the relay stopped) holds more
/// than once; prints the first few: each copy's number in the log and the edge
/// broker's packet id.
fn payloads_logged_twice(dir: &Path, topic: &str) -> usize {
    let (log, _) = edge_relay::log::Log::open(dir).expect("the relay's log opens");
    let mut seen = std::collections::BTreeMap::<Vec<u8>, Vec<(u64, u16)>>::new();
    let mut from = log.first();
    loop {
        let read = log.read_from(from, 1024, 16 << 20).expect("the log reads");
        let Some(&(last, _)) = read.last() else { break };
        for (number, entry) in read.into_iter().filter(|(_, entry)| entry.topic == topic) {
            seen.entry(entry.payload.to_vec())
                .or_default()
                .push((number, entry.edge_pkid));
        }
        from = last + 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, copies)| copies.len() > 1).collect();
    for (payload, copies) in twice.iter().take(10) {
        eprintln!(
            "logged twice: {} as (number, edge packet id) {copies:?}",
            String::from_utf8_lossy(payload)
        );
    }
    twice.len()
}

/// What the relay's exactly-once forwarding relies on, asked of the project's cloud
/// broker (Mosquitto 2.0) over the relay's own connection ([`edge_relay::cloud::Cloud`]):
/// a QoS 2 message it received (PUBREC) is delivered only at the PUBREL; sent again under
/// the same packet id by a client that crashed meanwhile and came back to its kept
/// session, it is a duplicate (PUBREC again) and delivered once; a PUBREL for an id it
/// does not hold is answered PUBCOMP; and a clean session first drops what it held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cloud_broker_takes_a_qos2_message_sent_again_under_its_id_as_a_duplicate() {
    use rumqttc::{Packet, PubRel};

    let brokers = spawn_relay_brokers().await;
    let port = brokers.cloud.port;
    let mut watcher = TestClient::connect(port, "mqtt-subscriber").await;
    watcher.subscribe(QOS2_TOPIC).await;

    // A new log: the first connection ends whatever the session held.
    let mut cloud = qos2_client(port, true, false).await;
    qos2_exchange(
        &mut cloud,
        qos2_publish(7, QoS::ExactlyOnce, "held"),
        rec(7),
    )
    .await;
    // Received, not released: a QoS 1 message after it is delivered first.
    let first = qos2_publish(60_001, QoS::AtLeastOnce, "first");
    qos2_exchange(&mut cloud, first, puback(60_001)).await;
    // The relay killed (no DISCONNECT), and started again on its kept session.
    drop(cloud);
    let mut cloud = qos2_client(port, false, true).await;
    let Packet::Publish(mut again) = qos2_publish(7, QoS::ExactlyOnce, "held") else {
        unreachable!()
    };
    again.dup = true;
    qos2_exchange(&mut cloud, Packet::Publish(again), rec(7)).await;
    qos2_exchange(&mut cloud, Packet::PubRel(PubRel::new(7)), comp(7)).await;
    // An id the broker does not hold: answered all the same.
    qos2_exchange(&mut cloud, Packet::PubRel(PubRel::new(9)), comp(9)).await;
    let last = qos2_publish(60_002, QoS::AtLeastOnce, "last");
    qos2_exchange(&mut cloud, last, puback(60_002)).await;
    let mut seen = Vec::new();
    while seen.last().map(String::as_str) != Some("last") {
        let message = watcher.next_message().await;
        seen.push(String::from_utf8(message.payload.to_vec()).expect("text"));
    }
    assert_eq!(
        seen,
        ["first", "held", "last"],
        "the held message once, at its release"
    );

    // Received and not released, then a new log (a clean session first): dropped.
    qos2_exchange(
        &mut cloud,
        qos2_publish(11, QoS::ExactlyOnce, "stale"),
        rec(11),
    )
    .await;
    drop(cloud);
    let mut cloud = qos2_client(port, true, false).await;
    qos2_exchange(&mut cloud, Packet::PubRel(PubRel::new(11)), comp(11)).await;
    let end = qos2_publish(60_003, QoS::AtLeastOnce, "end");
    qos2_exchange(&mut cloud, end, puback(60_003)).await;
    let message = watcher.next_message().await;
    assert_eq!(
        &message.payload[..],
        b"end",
        "the stale message was not dropped"
    );
    cloud.close().await;
}

const QOS2_TOPIC: &str = "/sensor/dup-1/temperature";

/// The relay's connection to the cloud broker at `port` as `edge-relay`, under a client
/// id of its own, connected (a session kept or not, as `present` says).
async fn qos2_client(port: u16, new_log: bool, present: bool) -> edge_relay::cloud::Cloud {
    let broker = iot_core::config::BrokerSettings {
        host: "127.0.0.1".into(),
        port,
        username: Some("edge-relay".into()),
        password: Some(tests::password("edge-relay")),
        tls_ca: None,
        keep_alive: Duration::from_secs(30),
        env_prefix: "CLOUD",
    };
    let options = broker
        .mqtt_options("test-qos2-relay", false)
        .expect("options");
    let mut cloud = edge_relay::cloud::Cloud::new(&broker, options, new_log);
    match qos2_next(&mut cloud).await {
        edge_relay::cloud::Heard::Connected { session_present } => {
            assert_eq!(session_present, present, "the session kept");
        }
        other => panic!("{other:?} instead of a connection"),
    }
    cloud
}

async fn qos2_next(cloud: &mut edge_relay::cloud::Cloud) -> edge_relay::cloud::Heard {
    tokio::time::timeout(Duration::from_secs(10), cloud.next())
        .await
        .expect("the broker answers")
        .expect("connected")
}

/// Writes `packet` and expects the broker to answer `answer`.
async fn qos2_exchange(
    cloud: &mut edge_relay::cloud::Cloud,
    packet: rumqttc::Packet,
    answer: rumqttc::Packet,
) {
    assert!(cloud.write([packet]).await, "written");
    match qos2_next(cloud).await {
        edge_relay::cloud::Heard::Packet(packet) => assert_eq!(packet, answer),
        other => panic!("{other:?} instead of {answer:?}"),
    }
}

fn qos2_publish(pid: u16, qos: QoS, payload: &str) -> rumqttc::Packet {
    let mut publish = rumqttc::Publish::new(QOS2_TOPIC, qos, payload.as_bytes().to_vec());
    publish.pkid = pid;
    rumqttc::Packet::Publish(publish)
}

fn rec(pid: u16) -> rumqttc::Packet {
    rumqttc::Packet::PubRec(rumqttc::PubRec::new(pid))
}

fn comp(pid: u16) -> rumqttc::Packet {
    rumqttc::Packet::PubComp(rumqttc::PubComp::new(pid))
}

fn puback(pid: u16) -> rumqttc::Packet {
    rumqttc::Packet::PubAck(rumqttc::PubAck::new(pid))
}

/// What the hops said that may have sent a message again: warnings and errors of the
/// persister (its reconnects), the cloud broker (a reused packet id) and the relay.
fn say_who_sent_again(persister: &Service, brokers: &Brokers, relay: &Service) {
    let said = |log: &str| {
        log.lines()
            .filter(|line| {
                // Mosquitto says a connection's end without a level: a persister dropped
                // for its keep-alive is sent its unacknowledged messages again.
                [
                    "WARN",
                    "ERROR",
                    "Reused",
                    "disconnect",
                    "timeout",
                    "Socket error",
                    "connected",
                ]
                .iter()
                .any(|word| line.contains(word))
            })
            .take(60)
            .collect::<Vec<_>>()
            .join("\n")
    };
    eprintln!("persister:\n{}", said(&persister.stderr()));
    eprintln!("cloud broker:\n{}", said(&brokers.cloud.log()));
    eprintln!("relay (last run):\n{}", said(&relay.stderr()));
}

/// The cloud machine loses power mid-stream (broker and persister SIGKILLed, the
/// broker's save gone: no sessions, nothing it had accepted), and the device stops
/// before the cloud is back: the relay refills the cloud from its log once the
/// persister subscribed again, and every keyed reading is stored once. Unkeyed
/// readings (plain values) of a second device meanwhile: none lost; those the cloud had
/// stored before the cut, inside the refill window, are stored a second time (what the
/// persister cannot tell from new ones).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_that_lost_its_state_is_refilled_from_the_relays_log() {
    let relay = cloud_power_loss("refill", &["--refill-delay", "10s"], UNKEYED).await;
    assert!(relay.stderr().contains("sending again what was forwarded"));
}

/// Plain values of the refill test, 1 to this, on [`UNKEYED_TOPIC`].
const UNKEYED: u32 = 3000;
const UNKEYED_TOPIC: &str = "/sensor/plain-1/temperature";

/// Publishes the plain values 1..=`count` at QoS 1 to the edge broker at `port`, about
/// one a millisecond (so that a power cut falls among them).
fn publish_unkeyed(port: u16, count: u32) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut device = TestClient::connect(port, "temperature-sensor").await;
        for value in 1..=count {
            let payload = value.to_string();
            device
                .publish(UNKEYED_TOPIC, QoS::AtLeastOnce, false, payload.as_bytes())
                .await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
}

/// Publishes the plain values 1..=`count` at QoS 1 to the edge broker at `port`, one
/// every `every` at most (each waits for the broker's acknowledgement).
fn publish_unkeyed_every(port: u16, count: u32, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut device = TestClient::connect(port, "temperature-sensor").await;
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for value in 1..=count {
            ticks.tick().await;
            let payload = value.to_string();
            device
                .publish(UNKEYED_TOPIC, QoS::AtLeastOnce, false, payload.as_bytes())
                .await;
        }
    })
}

/// The plain values stored for [`UNKEYED_TOPIC`]: how many of 1..=`count` at least
/// once, and how many documents in all.
async fn unkeyed_stored(db: &mongodb::Database, count: u32) -> (usize, usize) {
    let documents: Vec<Document> = db
        .collection::<Document>("readings")
        .find(doc! { "topic": UNKEYED_TOPIC })
        .await
        .expect("find")
        .try_collect()
        .await
        .expect("documents");
    let values: std::collections::BTreeSet<i64> = documents
        .iter()
        .filter_map(|d| d.get_f64("value").ok())
        .map(|value| value as i64)
        .filter(|value| (1..=i64::from(count)).contains(value))
        .collect();
    (values.len(), documents.len())
}

/// The same with a refill window too short for the loss: the persister finds the gap
/// and the relay answers its replay request from the log, the device being gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_devices_gap_is_repaired_from_the_relays_log() {
    let relay = cloud_power_loss(
        "repair",
        &["--refill-delay", "10s", "--refill-window", "1s"],
        0,
    )
    .await;
    let answered: u64 = relay
        .stderr()
        .lines()
        .filter(|line| line.contains("replay request answered"))
        .filter_map(|line| {
            line.split("from_log=")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    assert!(
        answered > 0,
        "no reading answered from the log: {}",
        relay.stderr()
    );
}

/// Streams 8000 readings of device `device` (and `unkeyed` plain values), cuts the
/// cloud's power after 1000 are stored, lets the device stop, brings the cloud back and
/// waits until every reading is stored exactly once (every plain value at least once);
/// gives back the relay (stopped) for its log.
async fn cloud_power_loss(device: &str, relay_args: &[&str], unkeyed: u32) -> tests::Service {
    let (mut brokers, mongo) = (spawn_relay_brokers().await, spawn_mongo().await);
    let log_dir = brokers.dir().join("relay-log");
    let mut relay = brokers.relay_ready(&log_dir, relay_args).await;
    let mut persister = brokers.persister_ready(&mongo, &[]).await;
    let db = mongo.database().await;

    let mut sensor = start_paced_sensor(&brokers, brokers.local.port, device, "8000");
    let plain = publish_unkeyed(brokers.local.port, unkeyed);
    wait_for(
        "1000 readings stored",
        || tests::stored::count(&db, doc! { "device": device }),
        |n| *n >= 1000,
    )
    .await;
    assert!(sensor.is_running(), "the stream ended before the power cut");
    brokers.cloud.kill_losing_state().await;
    persister.kill().await;
    let (_, unkeyed_before) = unkeyed_stored(&db, unkeyed).await;
    // The device finishes and stops: it cannot be asked for anything any more.
    sensor.expect_success().await;
    plain.await.expect("the plain values published");

    assert!(brokers.cloud.start().await, "{}", brokers.cloud.log());
    let mut persister = brokers.persister_ready(&mongo, &[]).await;
    relay
        .wait_for_log("the cloud broker came back without this relay's session")
        .await;
    tests::wait_for_within(
        CATCH_UP,
        "every reading stored",
        || tests::stored::count(&db, doc! { "device": device }),
        |n| *n >= 8000,
    )
    .await;
    assert_exactly_once(&stored_seqs(&db, device).await, 8000);
    if unkeyed > 0 {
        let (distinct, stored) = tests::wait_for_within(
            CATCH_UP,
            "every plain value stored",
            || unkeyed_stored(&db, unkeyed),
            |(distinct, _)| *distinct == unkeyed as usize,
        )
        .await;
        let twice = stored - distinct;
        eprintln!(
            "unkeyed: {unkeyed} published, {unkeyed_before} stored before the cut, {twice} stored twice"
        );
        assert!(
            twice <= unkeyed_before,
            "{twice} stored twice, of {unkeyed_before} stored before the power cut"
        );
    }
    relay.stop_cleanly().await;
    persister.stop_cleanly().await;
    relay
}

/// A log the store cannot open on start (every file of it overwritten): the relay says
/// so, naming where it moved the damaged store, starts a new log and keeps forwarding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_log_is_reported_set_aside_and_the_relay_goes_on() {
    let (brokers, mongo) = (spawn_relay_brokers().await, spawn_mongo().await);
    let log_dir = brokers.dir().join("relay-log");
    let mut relay = brokers.relay_ready(&log_dir, &[]).await;
    let mut persister = brokers.persister_ready(&mongo, &[]).await;
    let db = mongo.database().await;
    start_sensor(&brokers, "damaged-1", "100")
        .expect_success()
        .await;
    wait_for_readings(&db, doc! { "device": "damaged-1" }, 100).await;
    relay.stop_cleanly().await;

    let mut files = vec![log_dir.join("store")];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(
                std::fs::read_dir(&path)
                    .expect("the log's folder")
                    .map(|entry| entry.expect("entry").path()),
            );
        } else {
            std::fs::write(&path, b"not a store").expect("overwrite");
        }
    }
    let mut relay = brokers.relay_ready(&log_dir, &[]).await;
    let said = relay.stderr();
    let line = said
        .lines()
        .find(|line| line.contains("the log could not be opened"))
        .unwrap_or_else(|| panic!("no word of the damaged log:\n{said}"));
    assert!(line.contains("ERROR"), "{line}");
    let aside = line
        .split("moved aside to ")
        .nth(1)
        .and_then(|rest| rest.split(" and started").next())
        .unwrap_or_else(|| panic!("where it went: {line}"));
    assert!(std::path::Path::new(aside).is_dir(), "{aside} kept");

    start_sensor(&brokers, "damaged-2", "100")
        .expect_success()
        .await;
    wait_for_readings(&db, doc! { "device": "damaged-2" }, 100).await;
    relay.stop_cleanly().await;
    persister.stop_cleanly().await;
}

/// Names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("a folder")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// Publishes `count` plain values on `topic` to the edge broker and waits until each
/// arrived at `subscriber` (on the cloud broker).
async fn crosses(edge_port: u16, subscriber: &mut TestClient, topic: &str, count: usize) {
    let mut device = TestClient::connect(edge_port, "temperature-sensor").await;
    for payload in incompressible(count, 16) {
        device
            .publish(topic, QoS::AtLeastOnce, false, &payload)
            .await;
    }
    assert_every_number_arrives(subscriber, topic, count).await;
}

/// A second relay started on a log another relay holds: it refuses to start (exit 2),
/// naming the lock and the process holding it, and touches nothing; the first relay
/// goes on forwarding from the same folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_relay_on_a_held_log_is_refused_and_touches_nothing() {
    let brokers = spawn_relay_brokers().await;
    let log_dir = brokers.dir().join("relay-log");
    let mut first = brokers.relay_ready(&log_dir, &[]).await;
    let mut subscriber = TestClient::connect(brokers.cloud.port, "mqtt-subscriber").await;
    let topic = "/sensor/held-1/temperature";
    subscriber.subscribe(topic).await;
    crosses(brokers.local.port, &mut subscriber, topic, 100).await;
    let (folder, store) = (listing(&log_dir), listing(&log_dir.join("store")));

    let mut second = brokers.start_relay(&log_dir, &[]);
    let status = second.wait_exit().await;
    let said = second.stderr();
    assert_eq!(status.code(), Some(2), "{said}");
    let lock = log_dir.join("store").join("lock");
    let pid = first.pid().expect("the first relay runs");
    let line = said
        .lines()
        .find(|line| line.contains("the log is in use"))
        .unwrap_or_else(|| panic!("no word of the held log:\n{said}"));
    assert!(line.contains(&lock.display().to_string()), "{line}");
    assert!(line.contains(&format!("process {pid}")), "{line}");
    assert!(!said.contains("moved aside"), "{said}");
    assert_eq!(listing(&log_dir), folder, "the log's folder changed");
    assert_eq!(listing(&log_dir.join("store")), store, "the store changed");

    // The first relay goes on.
    crosses(brokers.local.port, &mut subscriber, topic, 100).await;
    assert!(first.is_running());
    first.stop_cleanly().await;
}

/// The largest publish the edge broker accepts (remaining length 2 097 151: Mosquitto
/// counts a packet as its remaining length + 1 against `max_packet_size` 2 MiB) is
/// logged and forwarded to the cloud unchanged; one byte more is refused by the edge
/// broker itself, so the relay never has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_message_the_brokers_accept_is_forwarded() {
    let brokers = spawn_relay_brokers().await;
    let log_dir = brokers.dir().join("relay-log");
    let (mut relay, port) = relay_with_metrics(&brokers, &log_dir, &[]).await;
    let topic = "/sensor/largest-1/temperature";
    let mut subscriber = TestClient::connect(brokers.cloud.port, "mqtt-subscriber").await;
    subscriber.subscribe(topic).await;

    // Remaining length: topic length (2) and topic, packet id (2), payload.
    let largest = iot_core::mqtt::MAX_OUTGOING_PACKET - 1 - 2 - topic.len() - 2;
    let payload = incompressible(1, largest).next().expect("a payload");
    let mut device = TestClient::connect(brokers.local.port, "temperature-sensor").await;
    assert!(device.try_publish(topic, false, &payload).await, "refused");
    let arrived = subscriber.next_message().await;
    assert_eq!(arrived.topic, topic);
    assert!(arrived.payload == payload, "changed on the way");

    let mut device = TestClient::connect(brokers.local.port, "temperature-sensor").await;
    let one_more = incompressible(1, largest + 1).next().expect("a payload");
    assert!(
        !device.try_publish(topic, false, &one_more).await,
        "the edge broker took a packet past its max_packet_size"
    );
    // Nothing of it reached the relay: a marker behind it is the next message it logs.
    let mut device = TestClient::connect(brokers.local.port, "temperature-sensor").await;
    device
        .publish(topic, QoS::AtLeastOnce, false, b"00000001;marker")
        .await;
    let marker = subscriber.next_message().await;
    assert_eq!(&marker.payload[..], b"00000001;marker");
    assert_eq!(metric(port, "iot_relay_logged_total").await, Some(2.0));
    assert_eq!(
        metric(port, "iot_relay_unforwardable_total")
            .await
            .unwrap_or(0.0),
        0.0
    );
    relay.stop_cleanly().await;
}

/// Messages of [`damaged_log`]: 7 000 of 3 000 bytes (21 MB, past the 16 MiB after
/// which the log flushes its messages from memory and journal into a table; below the
/// 4 KiB from which the journal compresses a value).
const DAMAGE_COUNT: usize = 7000;
const DAMAGE_SIZE: usize = 3000;

/// A stopped relay's log holding [`DAMAGE_COUNT`] messages not forwarded yet is
/// damaged by `damage` (given the store's folder); the relay started again with the
/// cloud up. Returns what the relay said about it (the first line mentioning `needle`),
/// how many messages it counted as lost (`iot_relay_set_aside_total`), and how many
/// distinct ones arrived at the cloud once its backlog was forwarded.
async fn damaged_log(
    brokers: &mut Brokers,
    name: &str,
    needle: &str,
    damage: impl FnOnce(&Path),
) -> (String, u64, usize) {
    let log_dir = brokers.dir().join(format!("{name}-log"));
    let topic = format!("/sensor/{name}/temperature");
    let (mut relay, port) = relay_with_metrics(brokers, &log_dir, &[]).await;
    brokers.cloud.stop().await;
    let device = TestClient::connect(brokers.local.port, "temperature-sensor").await;
    for payload in incompressible(DAMAGE_COUNT, DAMAGE_SIZE) {
        device
            .client
            .publish(&topic, QoS::AtLeastOnce, false, payload)
            .await
            .expect("publish request");
    }
    wait_for(
        "every message on the relay's disk",
        || metric(port, "iot_relay_backlog"),
        |backlog| *backlog == Some(DAMAGE_COUNT as f64),
    )
    .await;
    relay.stop_cleanly().await;
    damage(&log_dir.join("store"));

    assert!(brokers.cloud.start().await, "{}", brokers.cloud.log());
    let mut subscriber = TestClient::connect(brokers.cloud.port, "mqtt-subscriber").await;
    subscriber.subscribe(&topic).await;
    let (mut relay, port) = relay_with_metrics(brokers, &log_dir, &[]).await;
    let said = relay.stderr();
    let line = said
        .lines()
        .find(|line| line.contains(needle))
        .unwrap_or_else(|| panic!("no word of the damage ({needle}):\n{said}"))
        .to_string();
    assert!(line.contains("ERROR"), "{line}");
    tests::wait_for_within(
        CATCH_UP,
        "the readable backlog forwarded",
        || metric(port, "iot_relay_backlog"),
        |backlog| *backlog == Some(0.0),
    )
    .await;
    let lost = metric(port, "iot_relay_set_aside_total")
        .await
        .unwrap_or(0.0) as u64;
    // The cloud broker acknowledged everything; what it still holds for the subscriber
    // past its in-flight window comes after (a QoS 1 queue), so the count is read until
    // every message is accounted for, or no later than a few seconds on.
    let mut seen = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        for message in subscriber.messages_so_far().await {
            let n: usize = std::str::from_utf8(&message.payload[..8])
                .expect("its number")
                .parse()
                .expect("its number");
            seen.insert(n);
        }
        if seen.len() + lost as usize >= DAMAGE_COUNT || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    eprintln!(
        "{name}: {} of {DAMAGE_COUNT} forwarded, {lost} counted as lost: {line}",
        seen.len()
    );
    relay.stop_cleanly().await;
    (line, lost, seen.len())
}

/// Every file under `dir`.
fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("a folder") {
        let path = entry.expect("an entry").path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// The message table: the largest table file of the store.
fn message_table(store: &Path) -> std::path::PathBuf {
    files_under(store)
        .into_iter()
        .filter(|path| {
            path.parent()
                .is_some_and(|parent| parent.ends_with("tables"))
        })
        .max_by_key(|path| std::fs::metadata(path).expect("a table").len())
        .expect("a table: the log flushed")
}

/// Flips one bit of the byte at `at` of `file`.
fn flip(file: &Path, at: usize) {
    let mut bytes = std::fs::read(file).expect("the file");
    bytes[at] ^= 0x10;
    std::fs::write(file, bytes).expect("written back");
}

/// One byte flipped in a data block of the message table (in its middle: the blocks
/// of data come first, its index at the end): the relay starts, moves the damaged store
/// aside after copying what reads, forwards every other message and says how many it
/// lost. Before, it exited on every start ("cannot count the log").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_block_of_the_log_costs_its_messages_not_the_edge() {
    let mut brokers = spawn_relay_brokers().await;
    let (line, lost, arrived) =
        damaged_log(&mut brokers, "block-1", "unreadable blocks", |store| {
            let table = message_table(store);
            let length = std::fs::metadata(&table).expect("the table").len() as usize;
            flip(&table, length / 2);
        })
        .await;
    assert!(lost > 0 && lost < 100, "{lost} lost: {line}");
    assert_eq!(arrived + lost as usize, DAMAGE_COUNT, "{line}");
}

/// One byte flipped in the newest journal (what the log holds in memory, not yet in a
/// table), at 10, 50 and 90 % of what was written to it: the relay starts and forwards everything the log's tables hold and every intact batch
/// of the journal; what is lost is the damaged batch's messages that no table had, and
/// it says how many. Before, the whole store was moved aside (nothing forwarded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_journal_costs_at_most_its_damaged_batch() {
    let mut brokers = spawn_relay_brokers().await;
    for percent in [10, 50, 90] {
        let name = format!("journal-{percent}");
        let (line, lost, arrived) =
            damaged_log(&mut brokers, &name, "journal could not be read", |store| {
                let journal = files_under(store)
                    .into_iter()
                    .filter(|path| path.extension().is_some_and(|ext| ext == "jnl"))
                    .max_by_key(|path| {
                        let id = path.file_stem().and_then(|stem| stem.to_str());
                        id.and_then(|id| id.parse::<u64>().ok())
                            .expect("a journal's number")
                    })
                    .expect("a journal");
                let bytes = std::fs::read(&journal).expect("the journal");
                // What was written: the file is made longer at once and filled with zeros.
                let written = bytes.iter().rposition(|byte| *byte != 0).expect("written");
                flip(&journal, written * percent / 100);
            })
            .await;
        assert!(line.contains("could not be read"), "{line}");
        // One batch of the relay at most: 4 MiB of messages.
        let batch = edge_relay::intake::MAX_BATCH_BYTES as usize / DAMAGE_SIZE + 1;
        assert!(lost as usize <= batch, "{lost} lost at {percent} %: {line}");
        if line.contains("could not be parsed") {
            assert!(arrived + lost as usize <= DAMAGE_COUNT, "{line}");
            assert!(arrived + batch >= DAMAGE_COUNT, "{arrived} arrived: {line}");
        } else {
            assert_eq!(
                arrived + lost as usize,
                DAMAGE_COUNT,
                "at {percent} %: {line}"
            );
        }
    }
}

/// The message keyspace's `current` file removed (fjall took the keyspace for a
/// half-made one and deleted its tables: `messages=0 backlog=0`, nothing said): written
/// again from the keyspace's newest version file, said, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_current_file_is_made_again_and_nothing_is_lost() {
    let mut brokers = spawn_relay_brokers().await;
    let (line, lost, arrived) = damaged_log(&mut brokers, "current-1", "was missing", |store| {
        let keyspace = message_table(store)
            .parent()
            .and_then(Path::parent)
            .expect("the keyspace's folder")
            .to_path_buf();
        std::fs::remove_file(keyspace.join("current")).expect("current removed");
    })
    .await;
    assert_eq!((lost, arrived), (0, DAMAGE_COUNT), "{line}");
}

/// The edge machine loses power mid-stream: edge broker and relay SIGKILLed together,
/// the broker's save gone. Every reading the relay had taken onto its disk arrives;
/// what remains open is what the broker had acknowledged to the device and not yet
/// handed to the relay (the persister asks no device here: `--no-repair`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_power_cut_loses_nothing_the_relay_had_taken() {
    let (mut brokers, mongo) = (spawn_relay_brokers().await, spawn_mongo().await);
    let log_dir = brokers.dir().join("relay-log");
    let (mut relay, port) = relay_with_metrics(&brokers, &log_dir, &[]).await;
    let mut persister = brokers.persister_ready(&mongo, &["--no-repair"]).await;
    let db = mongo.database().await;

    let mut sensor = start_paced_sensor(&brokers, brokers.local.port, "edge-cut", "8000");
    let logged = wait_for(
        "2000 readings on the relay's disk",
        || metric(port, "iot_relay_logged_total"),
        |logged| logged.is_some_and(|logged| logged >= 2000.0),
    )
    .await
    .expect("logged");
    assert!(sensor.is_running(), "the stream ended before the power cut");
    brokers.local.kill_losing_state().await;
    relay.kill().await;
    assert!(brokers.local.start().await, "{}", brokers.local.log());
    let mut relay = brokers.relay_ready(&log_dir, &[]).await;
    sensor.expect_success().await;

    // Everything the relay had logged before the cut: the first `logged` readings.
    let taken = logged as i64;
    tests::wait_for_within(
        CATCH_UP,
        "every reading the relay had taken stored",
        || async {
            let seqs = stored_seqs(&db, "edge-cut").await;
            seqs.iter().filter(|(_, seq)| *seq <= taken).count() as i64
        },
        |n| *n == taken,
    )
    .await;
    let seqs = stored_seqs(&db, "edge-cut").await;
    let unique: std::collections::BTreeSet<_> = seqs.iter().collect();
    assert_eq!(unique.len(), seqs.len(), "duplicates stored");
    eprintln!(
        "edge power cut: {} of 8000 readings stored without repairs, every one of the {taken} the relay had taken",
        seqs.len()
    );
    relay.stop_cleanly().await;
    persister.stop_cleanly().await;
}

/// The cloud account of a site's relay: plant-1 the shared `edge-relay`, the others
/// their own (`tests::SITES`, made by `EDGE_SITES`).
fn site_account(site: &str) -> String {
    match site {
        "plant-1" => "edge-relay".to_string(),
        _ => format!("edge-relay-{site}"),
    }
}

/// Three edge sites into one cloud broker, each with its own relay (`--site`), one of
/// them SIGKILLed mid-stream and started again: every site's readings stored once.
/// plant-1 logs in to the cloud with the shared `edge-relay` account, plant-2 and
/// plant-3 with their own (`EDGE_SITES`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sites_into_one_cloud_each_stored_once() {
    let (brokers, mongo) = (spawn_relay_brokers().await, spawn_mongo().await);
    let (second, third) = (
        brokers.spawn_relay_site("plant-2").await,
        brokers.spawn_relay_site("plant-3").await,
    );
    let sites = [
        ("plant-1", &brokers.local),
        ("plant-2", &second),
        ("plant-3", &third),
    ];
    let mut persister = brokers.persister_ready(&mongo, &["--no-repair"]).await;
    let db = mongo.database().await;
    // plant-2's relay shows on its metrics how far its stream got; its stream is the
    // longest (10 s at 1000/s), so that the kill falls within it however busy the
    // machine is.
    let metrics_port = free_port();
    let metrics_address = format!("127.0.0.1:{metrics_port}");
    let mut relays = Vec::new();
    for (site, edge) in sites {
        let log_dir = brokers.dir().join(format!("{site}-log"));
        let mut args = vec!["--site", site];
        if site == "plant-2" {
            args.extend(["--metrics-address", &metrics_address]);
        }
        let account = site_account(site);
        relays.push(
            brokers
                .relay_ready_as(edge, &account, &log_dir, &args)
                .await,
        );
    }
    // Each relay's two cloud sessions log in with the site's own accounts.
    for user in ["edge-relay-plant-2", "edge-relay-plant-3-replay"] {
        brokers.cloud.wait_for_log(&format!("u'{user}'")).await;
    }
    let counts: [(&str, i64); 3] = [("plant-1", 3000), ("plant-2", 10_000), ("plant-3", 3000)];
    let mut sensors: Vec<Service> = sites
        .iter()
        .zip(counts)
        .map(|((site, edge), (_, count))| {
            start_paced_sensor(&brokers, edge.port, site, &count.to_string())
        })
        .collect();
    wait_for(
        "1000 readings of plant-2 on its relay's log",
        || metric(metrics_port, "iot_relay_logged_total"),
        |n| n.is_some_and(|n| n >= 1000.0),
    )
    .await;
    assert!(
        sensors[1].is_running(),
        "plant-2's stream ended before the kill"
    );
    relays[1].kill().await;
    let log_dir = brokers.dir().join("plant-2-log");
    relays[1] = brokers
        .relay_ready_as(
            &second,
            &site_account("plant-2"),
            &log_dir,
            &["--site", "plant-2"],
        )
        .await;
    for sensor in &mut sensors {
        sensor.expect_success().await;
    }
    for (site, count) in counts {
        tests::wait_for_within(
            CATCH_UP,
            &format!("every reading of {site} stored"),
            || tests::stored::count(&db, doc! { "device": site }),
            |n| *n >= count.unsigned_abs(),
        )
        .await;
        assert_exactly_once(&stored_seqs(&db, site).await, count);
    }
    for relay in &mut relays {
        relay.stop_cleanly().await;
    }
    persister.stop_cleanly().await;
}

/// `count` payloads of `size` bytes that no store compresses (an xorshift stream), each
/// starting with its number.
fn incompressible(count: usize, size: usize) -> impl Iterator<Item = Vec<u8>> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..count).map(move |n| {
        let mut payload = format!("{n:08};").into_bytes();
        while payload.len() < size {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            payload.extend_from_slice(&state.to_le_bytes());
        }
        payload.truncate(size);
        payload
    })
}

/// Reads `client`'s messages until every number below `count` came on `topic` (the
/// first 8 bytes of the payloads of [`incompressible`]). At least once over MQTT: a
/// copy sent again may come too.
async fn assert_every_number_arrives(client: &mut TestClient, topic: &str, count: usize) {
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < count {
        let message = client.next_message().await;
        if message.topic == topic {
            let n: usize = std::str::from_utf8(&message.payload[..8])
                .expect("its number")
                .parse()
                .expect("its number");
            assert!(n < count, "{n}");
            seen.insert(n);
        }
    }
}

/// The bytes the files under `dir` take on disk, as `du` counts them.
fn du(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(dir).expect("a folder") {
        let entry = entry.expect("an entry");
        let metadata = entry.metadata().expect("its metadata");
        total += if metadata.is_dir() {
            du(&entry.path())
        } else {
            metadata.blocks() * 512
        };
    }
    total
}

/// The relay's resident memory, from `/proc`.
fn rss_bytes(relay: &Service) -> u64 {
    let pid = relay.pid().expect("the relay runs");
    tests::rss_bytes(pid).expect("its VmRSS")
}

/// 600 MiB of QoS 0 while the relay holds back; none of it may stay in the relay. Where
/// it goes is a race, each way bounded: the relay reads it and drops what passes its
/// bound (64 MiB waiting, as many held for the disk), counted; or the relay has stopped
/// reading the edge link (1 000 QoS 1 messages waiting in it: `reading_paused`), and
/// the edge broker keeps or drops the rest (Mosquitto sends QoS 0 only within the
/// relay's receive maximum, and says so when it drops). The relay's memory is checked
/// after this.
async fn qos0_past_the_bounds(
    device: &mut TestClient,
    count: usize,
    metrics: u16,
    edge: &tests::Broker,
    relay: &Service,
) {
    let big = vec![b'7'; 1 << 20];
    // What the edge broker says from here on, of the relay's connection.
    let from = edge.log().len();
    for _ in 0..count {
        let topic = "/sensor/big-2/temperature";
        device.publish(topic, QoS::AtMostOnce, false, &big).await;
    }
    let (dropped, paused, by_broker) = wait_for(
        "QoS 0 messages dropped by the relay, or the relay not reading the edge link",
        || async {
            let dropped = metric(metrics, "iot_relay_qos0_dropped_total").await;
            let paused = metric(metrics, "iot_relay_reading_paused_total{link=\"edge\"}").await;
            let by_broker = edge.log().get(from..).is_some_and(|said| {
                said.contains("Outgoing messages are being dropped for client edge-relay")
            });
            (dropped.unwrap_or(0.0), paused.unwrap_or(0.0), by_broker)
        },
        |(dropped, paused, by_broker)| *dropped > 0.0 || *paused > 0.0 || *by_broker,
    )
    .await;
    assert!(dropped < count as f64, "{dropped}");
    if dropped > 0.0 {
        relay
            .wait_for_log("wait for the log: dropping new ones")
            .await;
    }
    eprintln!(
        "QoS 0 past the bounds: {dropped} dropped by the relay, its edge link paused {paused} times, the edge broker dropping: {by_broker}"
    );
}

/// The cloud down until the relay's disk budget (`--max-disk 128M`) is full of messages
/// not forwarded yet: the relay stops acknowledging (the edge broker holds the rest);
/// QoS 0 past a bound is dropped (by the relay, counted, or by the edge broker first:
/// [`qos0_past_the_bounds`]), not held; the relay's memory stays bounded; the cloud
/// back, every QoS 1 message arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_budget_holds_the_edge_back_and_drops_nothing_unforwarded() {
    const COUNT: usize = 12_000;
    const SIZE: usize = 16 * 1024;
    const QOS0: usize = 600;
    let mut brokers = spawn_relay_brokers().await;
    let log_dir = brokers.dir().join("relay-log");
    let (mut relay, port) = relay_with_metrics(&brokers, &log_dir, &["--max-disk", "128M"]).await;
    // A subscriber with a kept session on the cloud, away while the cloud is down: the
    // cloud broker keeps for it what the relay forwards later.
    let watcher = "test-disk-full-watcher";
    let cloud = brokers.cloud.port;
    let mut away = TestClient::try_connect(cloud, Some("mqtt-subscriber"), watcher, false)
        .await
        .expect("the watcher connects");
    away.subscribe("/sensor/+/temperature").await;
    drop(away);
    brokers.cloud.stop().await;

    // 197 MB of QoS 1 for a 128 MB budget: every one acknowledged by the edge broker.
    let mut device = TestClient::connect(brokers.local.port, "temperature-sensor").await;
    for payload in incompressible(COUNT, SIZE) {
        let topic = "/sensor/big-1/temperature";
        device
            .publish(topic, QoS::AtLeastOnce, false, &payload)
            .await;
    }
    wait_for(
        "back-pressure on the relay's metrics",
        || metric(port, "iot_relay_back_pressure"),
        |held| *held == Some(1.0),
    )
    .await;
    relay
        .wait_for_log("the log's disk budget is full of messages not forwarded yet")
        .await;
    let backlog = metric(port, "iot_relay_backlog").await.expect("backlog");
    assert!(
        backlog < COUNT as f64,
        "{backlog} logged of {COUNT}: no back-pressure"
    );
    // What a user finds on the disk: within the budget, past it by at most the one
    // batch that may overlap the relay's measurement (the relay counts more than du
    // finds: its journal at its most).
    let allocated = du(&log_dir);
    let bound = (128 << 20) + edge_relay::intake::MAX_BATCH_BYTES;
    assert!(allocated <= bound, "{allocated} bytes on disk for 128M");

    qos0_past_the_bounds(&mut device, QOS0, port, &brokers.local, &relay).await;
    // What it holds: at most the receive maximum of QoS 1 messages and the QoS 0 bounds.
    let rss = rss_bytes(&relay);
    assert!(rss < 512 << 20, "relay RSS {rss} bytes with a full disk");

    // The cloud back: the relay forwards, makes room, acknowledges again.
    assert!(brokers.cloud.start().await, "{}", brokers.cloud.log());
    relay
        .wait_for_log("room in the log again: acknowledging the edge broker")
        .await;
    tests::wait_for_within(
        CATCH_UP,
        "every QoS 1 message forwarded",
        || metric(port, "iot_relay_backlog"),
        |backlog| *backlog == Some(0.0),
    )
    .await;
    let mut back = TestClient::try_connect(cloud, Some("mqtt-subscriber"), watcher, false)
        .await
        .expect("the watcher connects again");
    assert!(back.session_present);
    assert_every_number_arrives(&mut back, "/sensor/big-1/temperature", COUNT).await;
    relay.stop_cleanly().await;
}

/// QoS 1 messages of 1 MiB from one device account while the disk budget is full: the
/// receive maximum alone would let 1 000 of them (1 GiB) wait in the relay's memory.
/// Past 64 MiB waiting it stops reading, the edge broker keeps the rest, and once the
/// cloud is back each arrives in the log once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_qos1_messages_past_a_full_budget_wait_in_the_broker_not_in_the_relay() {
    const COUNT: usize = 700;
    const SIZE: usize = 1 << 20;
    let mut brokers = spawn_relay_brokers().await;
    let log_dir = brokers.dir().join("relay-log");
    // A short keep-alive, so that the pause outlasts it: the edge broker closes the
    // connection, and sends again on the next what the relay had not acknowledged.
    let args = ["--max-disk", "128M", "--local-keep-alive", "5"];
    let (mut relay, port) = relay_with_metrics(&brokers, &log_dir, &args).await;
    brokers.cloud.stop().await;

    let mut device = TestClient::connect(brokers.local.port, "temperature-sensor").await;
    for payload in incompressible(COUNT, SIZE) {
        let topic = "/sensor/big-3/temperature";
        device
            .publish(topic, QoS::AtLeastOnce, false, &payload)
            .await;
    }
    relay
        .wait_for_log("the log's disk budget is full of messages not forwarded yet")
        .await;
    wait_for(
        "the relay to stop reading from the edge broker",
        || metric(port, "iot_relay_reading_paused_total{link=\"edge\"}"),
        |paused| paused.is_some_and(|paused| paused > 0.0),
    )
    .await;
    let logged = metric(port, "iot_relay_logged_total").await.unwrap_or(0.0);
    assert!(logged < COUNT as f64 / 2.0, "{logged} of {COUNT} logged");
    // Held: 64 MiB for the disk, 64 MiB waiting (and the message that passed the bound),
    // what the log keeps in memory until it flushes; seen: 312 MiB, and 900 MiB without
    // the bound on what waits.
    let rss = rss_bytes(&relay);
    assert!(
        rss < 448 << 20,
        "relay RSS {rss} bytes with {} MiB waiting on the edge",
        COUNT - logged as usize
    );

    brokers
        .local
        .wait_for_log("edge-relay-edge has exceeded timeout")
        .await;

    assert!(brokers.cloud.start().await, "{}", brokers.cloud.log());
    // 700 MiB through a budget with room for 64 MiB of them at a time, each round
    // waiting for forwarded ones to be deleted and compacted away: alone about 30 s, with
    // the other tests of this file beside it 609 of 700 in 90 s.
    tests::wait_for_within(
        3 * CATCH_UP,
        "every message logged and forwarded",
        || async {
            let logged = metric(port, "iot_relay_logged_total").await;
            let backlog = metric(port, "iot_relay_backlog").await;
            (logged, backlog)
        },
        |(logged, backlog)| *logged >= Some(COUNT as f64) && *backlog == Some(0.0),
    )
    .await;
    let logged = metric(port, "iot_relay_logged_total").await;
    assert_eq!(logged, Some(COUNT as f64), "each message in the log once");
    assert!(
        relay
            .stderr()
            .contains("acknowledging copies the edge broker sent again"),
        "no acknowledgement was lost with a connection: the test saw no copies"
    );
    relay.stop_cleanly().await;
}

/// Seconds of CPU a process has spent (user and system), from `/proc/PID/stat`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("its stat");
    // Fields after the command (in parentheses, which may hold blanks): utime and stime
    // are the 14th and 15th of the line, the 12th and 13th after the parenthesis.
    let after = &stat[stat.rfind(')').expect("the command") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // The kernel's clock ticks per second (USER_HZ), 100 on Linux.
    ticks as f64 / 100.0
}

/// 500 messages of 2 MB (1 GB) through the relay and forwarded, then the relay idle
/// with them kept for its retention: within 10 s its memory is back under the idle
/// figure plus the bound `docs/edge-relay.md` states, and it spends next to no CPU (its
/// housekeeping learns the messages' ages from a small index, not by reading them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_relay_after_a_gigabyte_forwarded_is_back_to_its_idle_memory_and_cpu() {
    const COUNT: usize = 500;
    const SIZE: usize = 2_000_000;
    let brokers = spawn_relay_brokers().await;
    // The log may take half of the file system's free space (a message is on disk twice
    // until its journal goes): with less, the relay rightly deletes forwarded messages
    // early, and fewer than all of them are kept.
    let free = edge_relay::log::free_bytes(brokers.dir()).expect("free space");
    assert!(
        free >= 3 << 30,
        "this test keeps 1 GB in the relay's log: it needs 3 GiB free under {}, {} MiB are",
        brokers.dir().display(),
        free >> 20
    );
    let log_dir = brokers.dir().join("relay-log");
    let (mut relay, port) = relay_with_metrics(&brokers, &log_dir, &["--max-disk", "4G"]).await;
    let pid = relay.pid().expect("the relay runs");
    let idle = rss_bytes(&relay);
    eprintln!("idle RSS at start: {} MiB", idle >> 20);

    let mut device = TestClient::connect(brokers.local.port, "temperature-sensor").await;
    for payload in incompressible(COUNT, SIZE) {
        let topic = "/sensor/big-5/temperature";
        device
            .publish(topic, QoS::AtLeastOnce, false, &payload)
            .await;
    }
    tests::wait_for_within(
        CATCH_UP,
        "every message forwarded",
        || metric(port, "iot_relay_forwarded_total"),
        |forwarded| forwarded.is_some_and(|n| n >= COUNT as f64),
    )
    .await;
    // Kept for the retention (the keeper's gauges follow within a second).
    wait_for(
        "every message kept",
        || metric(port, "iot_relay_kept"),
        |kept| *kept == Some(COUNT as f64),
    )
    .await;

    // Within 10 s (the store compacts what it took meanwhile): memory back, and a
    // second of next to no CPU.
    let bound = idle + edge_relay::IDLE_MEMORY_BOUND;
    let share_over = |seconds: u64| async move {
        let (before, started) = (cpu_seconds(pid), std::time::Instant::now());
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        (cpu_seconds(pid) - before) / started.elapsed().as_secs_f64()
    };
    let (rss, _) = tests::wait_for_within(
        Duration::from_secs(10),
        "the relay's memory back to idle, its CPU near zero",
        || async { (rss_bytes(&relay), share_over(1).await) },
        |(rss, share)| *rss <= bound && *share < 0.05,
    )
    .await;
    // And so it stays: over 5 s, as a share of one core.
    let share = share_over(5).await;
    eprintln!(
        "idle after {COUNT} messages of {SIZE} B forwarded: RSS {} MiB (idle {} MiB), CPU {:.1} % of a core",
        rss >> 20,
        idle >> 20,
        share * 100.0
    );
    assert!(share < 0.05, "{:.1} % of a core while idle", share * 100.0);
    relay.stop_cleanly().await;
}

/// A tmpfs of its own for one test, unmounted when dropped (a failed test too).
#[derive(Debug)]
struct SmallFileSystem {
    dir: std::path::PathBuf,
}

impl SmallFileSystem {
    /// Mounts a tmpfs of `size` (`200m`) on `dir`; why not, when it cannot.
    fn mount(dir: &Path, size: &str) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|error| error.to_string())?;
        let output = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|error| format!("cannot run mount: {error}"))?;
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).trim().to_string());
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// Bytes free on it, as `df` says.
    fn available(&self) -> u64 {
        let output = std::process::Command::new("df")
            .args(["-B1", "--output=avail"])
            .arg(&self.dir)
            .output()
            .expect("df runs");
        let text = String::from_utf8_lossy(&output.stdout);
        text.lines()
            .nth(1)
            .and_then(|line| line.trim().parse().ok())
            .expect("df's figure")
    }

    /// Fills what is free with one file, to the last byte (the file system full of
    /// something else); returns the file.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.dir.join("filler");
        // At once where fallocate can (a few milliseconds, where writing it took up to
        // a few hundred beside other tests), then written to the last byte.
        let _ = std::process::Command::new("fallocate")
            .args(["-l", &self.available().to_string()])
            .arg(&path)
            .status();
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .expect("the filler");
        let block = vec![0xA5u8; 64 * 1024];
        let mut left = block.len();
        // Down to single bytes: the file system's last partial page too.
        while left > 0 {
            match file.write(&block[..left]) {
                Ok(0) => break,
                Ok(_) => {}
                Err(_) => left /= 2,
            }
        }
        let _ = file.sync_all();
        path
    }
}

impl Drop for SmallFileSystem {
    fn drop(&mut self) {
        // Lazily: a relay still running on it when the test failed goes on the way out.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

/// The relay's log on a 200 MiB file system with `--max-disk 1G`, the cloud down, a
/// stream larger than the file system: the relay stops taking from the edge broker
/// before the file system is full (the broker keeps the rest), never exits, starts on a
/// file system filled to the last byte (forwarding what it has, and trimming it once the
/// cloud took it as soon as a little room is free), and goes on when the file system
/// fills under a write (the store refuses every write after one that failed: it is
/// opened again). Every message the edge broker acknowledged to the device arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_file_system_holds_the_edge_back_and_the_relay_goes_on() {
    let mut brokers = spawn_relay_brokers().await;
    let small = match SmallFileSystem::mount(&brokers.dir().join("small"), "200m") {
        Ok(small) => small,
        Err(why) => {
            tests::skipped(&format!(
                "cannot mount a 200M tmpfs for the relay's log: {why}"
            ));
            return;
        }
    };
    let log_dir = small.dir.join("relay-log");
    let (relay, logged) = fill_with_the_cloud_down(&mut brokers, &small, &log_dir).await;
    let (mut relay, mut back) = start_on_a_full_file_system(&mut brokers, &small, relay).await;
    let mut seen = std::collections::BTreeSet::new();
    let held = numbers_until(&mut back, FULL_FS_TOPIC, &mut seen, logged, CATCH_UP).await;
    assert!(
        held,
        "{} of the {logged} messages the log held arrived; the relay logged:\n{}",
        seen.len(),
        relay.0.stderr()
    );
    tests::wait_for_within(
        CATCH_UP,
        "what the log held forwarded",
        || metric(relay.1, "iot_relay_backlog"),
        |backlog| *backlog == Some(0.0),
    )
    .await;
    assert!(relay.0.is_running(), "{}", relay.0.stderr());

    // A little room (1 MiB, less than what the relay keeps free): it trims what was
    // forwarded, so that the file system has room again, and takes the rest.
    let filler = small.dir.join("filler");
    let length = std::fs::metadata(&filler).expect("the filler").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .and_then(|file| file.set_len(length.saturating_sub(1 << 20)))
        .expect("the filler shrinks");
    tests::wait_for_within(
        CATCH_UP,
        "room in the log again",
        || async {
            let resumed = relay
                .0
                .stderr()
                .contains("room in the log again: acknowledging the edge broker");
            (resumed, small.available(), du_files(&log_dir))
        },
        |(resumed, ..)| *resumed,
    )
    .await;

    std::fs::remove_file(&filler).expect("the filler goes");
    let all = numbers_until(
        &mut back,
        FULL_FS_TOPIC,
        &mut seen,
        FULL_FS_COUNT,
        3 * CATCH_UP,
    );
    if !all.await {
        panic!(
            "{} of {FULL_FS_COUNT} messages arrived; the relay logged:\n{}",
            seen.len(),
            relay.0.stderr()
        );
    }
    let sent = a_write_the_file_system_refuses(&small, &relay, brokers.local.port).await;
    let all = FULL_FS_COUNT + sent;
    if !numbers_until(&mut back, FULL_FS_TOPIC, &mut seen, all, CATCH_UP).await {
        panic!(
            "the message of a failed write did not arrive ({} of {all}); the relay logged:\n{}",
            seen.len(),
            relay.0.stderr()
        );
    }
    assert!(relay.0.is_running(), "{}", relay.0.stderr());
    relay.0.stop_cleanly().await;
}

/// The file system filled by another writer after the relay measured its room, and a
/// message then: the relay writes it, the file system refuses, the store refuses every
/// write after that, and the relay opens it again (the message, not acknowledged, comes
/// again). Tried until the relay's write came before its next measurement (once a
/// second): on a loaded machine the write may come later than that many times in a
/// row (10 tries were not enough once in five runs beside other heavy tests), so up to
/// [`REFUSED_WRITE_TRIES`]. Returns the messages sent.
async fn a_write_the_file_system_refuses(
    small: &SmallFileSystem,
    relay: &(Service, u16),
    edge: u16,
) -> usize {
    let mut device = TestClient::connect(edge, "temperature-sensor").await;
    for attempt in 0..REFUSED_WRITE_TRIES {
        // A store that failed is opened again after a backoff of up to 30 s.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let room = metric(relay.1, "iot_relay_room_bytes").await;
            if room.is_some_and(|room| room > (1 << 20) as f64) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "attempt {attempt}: no room measured within 60 s ({room:?}, {} bytes free); the relay logged:\n{}",
                small.available(),
                relay.0.stderr()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let filler = small.fill();
        let payload = incompressible(FULL_FS_COUNT + attempt + 1, 64 * 1024)
            .last()
            .expect("a payload");
        device
            .publish(FULL_FS_TOPIC, QoS::AtLeastOnce, false, &payload)
            .await;
        let (reopened, _) = tests::wait_for(
            "the write refused, or the room measured first",
            || async {
                let reopened = relay.0.stderr().contains("opening the log again");
                (reopened, metric(relay.1, "iot_relay_room_bytes").await)
            },
            |(reopened, room)| *reopened || *room == Some(0.0),
        )
        .await;
        std::fs::remove_file(&filler).expect("the filler goes");
        if reopened {
            let stderr = relay.0.stderr();
            let said = stderr
                .lines()
                .find(|line| line.contains("opening the log again"));
            eprintln!("at attempt {attempt}: {}", said.unwrap_or_default());
            return attempt + 1;
        }
    }
    panic!("the relay measured the full file system before each write");
}

/// Tries of [`a_write_the_file_system_refuses`], about 2 s each.
const REFUSED_WRITE_TRIES: usize = 40;

/// Messages of [`a_full_file_system_holds_the_edge_back_and_the_relay_goes_on`]: 312 MiB
/// for a 200 MiB file system.
const FULL_FS_COUNT: usize = 2500;
const FULL_FS_SIZE: usize = 128 * 1024;
const FULL_FS_TOPIC: &str = "/sensor/big-6/temperature";
const FULL_FS_WATCHER: &str = "test-full-fs-watcher";
const FULL_FS_ARGS: [&str; 2] = ["--max-disk", "1G"];

/// The relay on `log_dir`, the cloud down, every message published and acknowledged by
/// the edge broker: until the relay holds the edge back for the file system. The relay
/// and how many messages it logged.
async fn fill_with_the_cloud_down(
    brokers: &mut Brokers,
    small: &SmallFileSystem,
    log_dir: &Path,
) -> (Service, usize) {
    let (relay, port) = relay_with_metrics(brokers, log_dir, &FULL_FS_ARGS).await;
    let pid = relay.pid();
    let peak = DuPeak::watch(log_dir);
    let cloud = brokers.cloud.port;
    let mut away = TestClient::try_connect(cloud, Some("mqtt-subscriber"), FULL_FS_WATCHER, false)
        .await
        .expect("the watcher connects");
    away.subscribe(FULL_FS_TOPIC).await;
    drop(away);
    brokers.cloud.stop().await;

    let mut device = TestClient::connect(brokers.local.port, "temperature-sensor").await;
    for payload in incompressible(FULL_FS_COUNT, FULL_FS_SIZE) {
        device
            .publish(FULL_FS_TOPIC, QoS::AtLeastOnce, false, &payload)
            .await;
    }
    relay
        .wait_for_log("the file system of the log is nearly full")
        .await;
    wait_for(
        "back-pressure on the relay's metrics",
        || metric(port, "iot_relay_back_pressure"),
        |held| *held == Some(1.0),
    )
    .await;
    let logged = metric(port, "iot_relay_logged_total").await.unwrap_or(0.0);
    eprintln!(
        "held back at {logged} of {FULL_FS_COUNT} messages logged; {} MiB free, the log {} MiB (at most {} MiB) of the 200 MiB file system",
        small.available() >> 20,
        du(log_dir) >> 20,
        peak.peak() >> 20
    );
    assert!(
        logged < FULL_FS_COUNT as f64,
        "{logged} logged: no back-pressure"
    );
    assert!(relay.pid() == pid, "the relay was started again");
    (relay, logged as usize)
}

/// The relay killed, the file system filled to the last byte, the relay started again
/// and the cloud back: the relay (and its metrics port) and the watcher, back on the
/// cloud with its kept session.
async fn start_on_a_full_file_system(
    brokers: &mut Brokers,
    small: &SmallFileSystem,
    mut relay: Service,
) -> ((Service, u16), TestClient) {
    relay.kill().await;
    small.fill();
    assert_eq!(small.available(), 0, "the file system is full");
    let log_dir = small.dir.join("relay-log");
    let (relay, port) = relay_on_edge(brokers, &log_dir, &FULL_FS_ARGS).await;
    // "full: writing nothing" while nothing is free, "nearly full" once the store's
    // recovery gave back a little (it cuts its journal at the last whole batch).
    relay.wait_for_log("the file system of the log is").await;
    assert!(brokers.cloud.start().await, "{}", brokers.cloud.log());
    relay.wait_for_log("subscribed on the cloud broker").await;
    let cloud = brokers.cloud.port;
    let back = TestClient::try_connect(cloud, Some("mqtt-subscriber"), FULL_FS_WATCHER, false)
        .await
        .expect("the watcher connects again");
    assert!(back.session_present);
    ((relay, port), back)
}

/// The relay with its metrics on a free port, once started (the cloud may be down; the
/// edge broker's subscription acknowledgement may wait behind the messages of a kept
/// session that a full disk holds back).
async fn relay_on_edge(brokers: &Brokers, log_dir: &Path, args: &[&str]) -> (Service, u16) {
    brokers.start_relay_with_metrics(log_dir, args).await
}

/// Reads `client`'s messages on `topic` into `seen` (the numbers of [`incompressible`])
/// until it holds `count` of them, for `within` at most (however long the relay pauses
/// between two, as beside other tests on a busy machine): whether it does.
async fn numbers_until(
    client: &mut TestClient,
    topic: &str,
    seen: &mut std::collections::BTreeSet<usize>,
    count: usize,
    within: Duration,
) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while seen.len() < count {
        for message in client.messages_so_far().await {
            if message.topic == topic {
                let n: usize = std::str::from_utf8(&message.payload[..8])
                    .expect("its number")
                    .parse()
                    .expect("its number");
                seen.insert(n);
            }
        }
        if tokio::time::Instant::now() > deadline {
            return seen.len() >= count;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    true
}

/// The bytes the files under `dir` take on disk, as `du` counts them, while the relay
/// changes them: a file gone meanwhile counts nothing.
fn du_now(dir: &Path) -> u64 {
    du_files(dir).iter().map(|(bytes, _)| bytes).sum()
}

/// The files under `dir` and the bytes each takes on disk, largest first.
fn du_files(dir: &Path) -> Vec<(u64, String)> {
    use std::os::unix::fs::MetadataExt;
    let mut files = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return files;
    };
    for entry in entries.flatten() {
        match entry.metadata() {
            Ok(metadata) if metadata.is_dir() => files.extend(du_files(&entry.path())),
            Ok(metadata) => {
                files.push((metadata.blocks() * 512, entry.path().display().to_string()))
            }
            Err(_) => {}
        }
    }
    files.sort_unstable_by(|a, b| b.cmp(a));
    files
}

/// The most `du` of `dir` reached, sampled every 10 ms until dropped, and what took it.
#[derive(Debug)]
struct DuPeak {
    peak: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    files: std::sync::Arc<std::sync::Mutex<Vec<(u64, String)>>>,
}

impl DuPeak {
    fn watch(dir: &Path) -> Self {
        use std::sync::atomic::Ordering;
        let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let files: std::sync::Arc<std::sync::Mutex<Vec<(u64, String)>>> = std::sync::Arc::default();
        let (at, done, dir, listing) = (
            std::sync::Arc::clone(&peak),
            std::sync::Arc::clone(&stop),
            dir.to_path_buf(),
            std::sync::Arc::clone(&files),
        );
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                let now = du_files(&dir);
                let total = now.iter().map(|(bytes, _)| bytes).sum();
                if at.fetch_max(total, Ordering::Relaxed) < total {
                    if let Ok(mut files) = listing.lock() {
                        *files = now;
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Self { peak, stop, files }
    }

    /// The files at the peak, one a line, the largest first.
    fn files(&self) -> String {
        let files = self
            .files
            .lock()
            .map(|files| files.clone())
            .unwrap_or_default();
        files
            .iter()
            .take(40)
            .map(|(bytes, path)| format!("{:>10} {path}\n", bytes >> 10))
            .collect()
    }

    fn peak(&self) -> u64 {
        self.peak.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for DuPeak {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// `--max-disk 128M` under a fast stream of large incompressible messages, first with
/// the cloud down (the budget fills with messages not forwarded yet), then with it back
/// (forwarded messages deleted early to make room while the stream goes on): `du` of the
/// log, sampled every 10 ms throughout, never passes the bound docs/edge-relay.md states.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_stays_within_max_disk_under_a_fast_stream_of_large_messages() {
    const SIZE: usize = 256 * 1024;
    const DOWN: usize = 800;
    const UP: usize = 1600;
    const TOPIC: &str = "/sensor/big-7/temperature";
    let max_disk: u64 = 128 << 20;
    let mut brokers = spawn_relay_brokers().await;
    let log_dir = brokers.dir().join("relay-log");
    let (mut relay, port) = relay_with_metrics(&brokers, &log_dir, &["--max-disk", "128M"]).await;
    let peak = DuPeak::watch(&log_dir);
    brokers.cloud.stop().await;

    let mut device = TestClient::connect(brokers.local.port, "temperature-sensor").await;
    let mut payloads = incompressible(DOWN + UP, SIZE);
    for payload in payloads.by_ref().take(DOWN) {
        device
            .publish(TOPIC, QoS::AtLeastOnce, false, &payload)
            .await;
    }
    relay
        .wait_for_log("the log's disk budget is full of messages not forwarded yet")
        .await;
    let held = peak.peak();
    assert!(brokers.cloud.start().await, "{}", brokers.cloud.log());
    for payload in payloads {
        device
            .publish(TOPIC, QoS::AtLeastOnce, false, &payload)
            .await;
    }
    tests::wait_for_within(
        3 * CATCH_UP,
        "every message logged and forwarded",
        || async {
            let logged = metric(port, "iot_relay_logged_total").await;
            let backlog = metric(port, "iot_relay_backlog").await;
            let kept = metric(port, "iot_relay_kept").await;
            let disk = metric(port, "iot_relay_disk_bytes").await;
            (logged, backlog, kept, disk, du_now(&log_dir))
        },
        |(logged, backlog, ..)| *logged >= Some((DOWN + UP) as f64) && *backlog == Some(0.0),
    )
    .await;
    let bound = edge_relay::disk_bound(max_disk);
    eprintln!(
        "du of the log at most {} MiB while held back, {} MiB in all, for --max-disk {} MiB (bound {} MiB)",
        held >> 20,
        peak.peak() >> 20,
        max_disk >> 20,
        bound >> 20
    );
    assert!(
        peak.peak() <= bound,
        "du reached {} bytes for --max-disk {max_disk} (bound {bound}); KiB then:\n{}",
        peak.peak(),
        peak.files()
    );
    relay.stop_cleanly().await;
}
