//! One device account's flood through `edge-relay` (the project's brokers with
//! `EDGE_FORWARDER=relay`, the relay reading the edge broker's accounts) beside an honest
//! JSON QoS 1 sensor, with the cloud up and with the cloud down: the flood takes its
//! account's share of the relay's log and no more (the rest is refused and counted), the
//! honest readings are all stored once within seconds, and the edge broker's memory
//! stays bounded. And each device account's message size: the largest it may send
//! passes, one byte more is refused and counted while the rest goes on.

// Each test is one scenario, read top to bottom: the services' 80-line bound
// (clippy.toml) is not for them.
#![allow(clippy::too_many_lines)]

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bson::{doc, Document};
use futures_util::TryStreamExt;
use rumqttc::QoS;
use tests::stored::{assert_exactly_once, count, stored_seqs};
use tests::{prometheus, spawn_mongo, spawn_relay_brokers, Brokers, Service, TestClient};

/// A flooding account's messages: under a device account's default limit (256 KiB),
/// so that its share, not its size limit, is what holds it.
const FLOOD_MESSAGE: usize = 200 << 10;
/// How many: about 500 MB, twice the relay's default disk budget's half.
const FLOOD_COUNT: usize = 2_500;
/// The longest an honest reading may take from its device to the database, while the
/// cloud is up, one account flooding beside it.
const HONEST_DELAY_MS: i64 = 5_000;
/// The most the edge broker may take in memory meanwhile (it held 808 MB with the
/// cloud up and 1.33 GB with the cloud down before the relay refused what is past an
/// account's share; its own bound for the relay is 160 MiB in flight and 1 GiB queued).
const BROKER_RSS: u64 = 400 << 20;
/// Time allowed for the relay and the persister to reconnect to a cloud broker that
/// came back (their backoff grows during the outage, up to 30 s each), and the backlog
/// to drain.
const CATCH_UP: Duration = Duration::from_secs(120);

/// One value of the relay's metrics on `port` (0 when not there yet).
async fn metric(port: u16, name: &str) -> f64 {
    let (_, body) = prometheus::get(port, "/metrics").await;
    prometheus::sample(&body, name).unwrap_or(0.0)
}

/// [`Brokers::relay_with_metrics`], as the tests here call it.
async fn relay_with_metrics(brokers: &Brokers, log_dir: &Path, args: &[&str]) -> (Service, u16) {
    brokers.relay_with_metrics(log_dir, args).await
}

/// An honest sensor (the services' `temperature-sensor` account): `count` JSON readings
/// of `device` at QoS 1, one every 50 ms.
fn honest(brokers: &Brokers, device: &str, count: &str) -> Service {
    brokers.start_edge(
        "temperature-sensor",
        &[
            "--format",
            "json",
            "--qos",
            "1",
            "--interval",
            "0.05",
            "--no-retain",
            "--count",
            count,
            "--device",
            device,
        ],
    )
}

/// Device account `name` publishes `count` messages of `size` bytes at QoS 1 to
/// `topic`, as fast as the broker acknowledges them.
fn flood(
    port: u16,
    name: &'static str,
    password: String,
    topic: &'static str,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut client = TestClient::try_connect_as(port, name, &password)
            .await
            .expect("the flooding account logs in");
        let payload = vec![b'x'; FLOOD_MESSAGE];
        for _ in 0..FLOOD_COUNT {
            client
                .publish(topic, QoS::AtLeastOnce, false, &payload)
                .await;
        }
    })
}

/// The highest memory of process `pid`, sampled every 100 ms until `stop`.
fn peak_rss(pid: u32, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut peak = 0;
        let mut ticks = tokio::time::interval(Duration::from_millis(100));
        while !stop.load(Ordering::Acquire) {
            ticks.tick().await;
            peak = peak.max(tests::rss_bytes(pid).unwrap_or(0));
        }
        peak
    })
}

/// The edge broker dropped nothing for the relay: its queue for the relay (bounded in
/// bytes) never filled.
fn assert_nothing_dropped(brokers: &Brokers) {
    let log = brokers.local.log();
    assert!(
        !log.contains("Outgoing messages are being dropped"),
        "the edge broker dropped messages:\n{log}"
    );
}

/// The longest an honest reading of `device` took from its time to the database.
async fn slowest_ms(db: &mongodb::Database, device: &str) -> i64 {
    let readings: Vec<Document> = db
        .collection::<Document>(iot_store::READINGS)
        .find(doc! { "device": device })
        .await
        .expect("find")
        .try_collect()
        .await
        .expect("readings");
    readings
        .iter()
        .map(|document| {
            let ts = document.get_datetime("ts").expect("ts").timestamp_millis();
            let received = document.get_datetime("received_at").expect("received_at");
            received.timestamp_millis() - ts
        })
        .max()
        .expect("readings")
}

/// With the cloud up, one device account publishes 500 MB as fast as the edge broker
/// takes it (before: an honest sensor's readings waited up to 31.9 s behind such a
/// flood, and the edge broker grew to 808 MB). The account's share of the log is
/// forwarded, the rest refused and counted; every honest reading is stored once within
/// [`HONEST_DELAY_MS`], and the edge broker stays under [`BROKER_RSS`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_accounts_flood_with_the_cloud_up_costs_the_others_seconds() {
    let (brokers, mongo) = (spawn_relay_brokers().await, spawn_mongo().await);
    let db = mongo.database().await;
    let password = brokers.local.add_device("flood-1", "tasmota");
    let log_dir = brokers.dir().join("relay-log");
    let (_relay, metrics_port) = relay_with_metrics(&brokers, &log_dir, &[]).await;
    let _persister = brokers.persister_ready(&mongo, &[]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let broker_pid = brokers.local.pid().expect("the edge broker runs");
    let peak = peak_rss(broker_pid, Arc::clone(&stop));

    let mut sensor = honest(&brokers, "honest-1", "300");
    let flooding = flood(
        brokers.local.port,
        "flood-1",
        password,
        "tele/flood-1/SENSOR",
    );
    sensor.expect_success().await;
    flooding.await.expect("the flood ran");
    tests::wait_for_within(
        Duration::from_secs(60),
        "every honest reading stored",
        || count(&db, doc! { "device": "honest-1" }),
        |stored| *stored >= 300,
    )
    .await;
    stop.store(true, Ordering::Release);
    let peak = peak.await.expect("sampled");

    assert_exactly_once(&stored_seqs(&db, "honest-1").await, 300);
    assert_nothing_dropped(&brokers);
    let slowest = slowest_ms(&db, "honest-1").await;
    let refused = metric(
        metrics_port,
        "iot_relay_refused_total{reason=\"over_share\"}",
    )
    .await;
    let logged = metric(metrics_port, "iot_relay_logged_total").await;
    eprintln!(
        "cloud up: honest slowest {slowest} ms; edge broker peak {} MiB; relay logged {logged}, refused {refused} of the flood's {FLOOD_COUNT}",
        peak >> 20
    );
    assert!(
        slowest <= HONEST_DELAY_MS,
        "an honest reading waited {slowest} ms"
    );
    assert!(
        peak < BROKER_RSS,
        "the edge broker peaked at {} MiB",
        peak >> 20
    );
    assert!(refused > 0.0, "nothing of the flood was refused");
}

/// With the cloud down, one device account publishes 500 MB (before: the relay's disk
/// budget filled with it, the edge broker held the rest in memory, 1.33 GB, and honest
/// readings waited up to 155 s once the cloud was back). The account fills its share of
/// a 128M budget and no more; the edge broker stays under [`BROKER_RSS`]; once the cloud
/// is back every honest reading of the outage is stored once, and a sensor started then
/// has each reading stored within [`HONEST_DELAY_MS`] while the backlog drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_accounts_flood_with_the_cloud_down_takes_its_share_and_no_more() {
    let (mut brokers, mongo) = (spawn_relay_brokers().await, spawn_mongo().await);
    let db = mongo.database().await;
    let password = brokers.local.add_device("flood-2", "tasmota");
    let log_dir = brokers.dir().join("relay-log");
    let (_relay, metrics_port) =
        relay_with_metrics(&brokers, &log_dir, &["--max-disk", "128M"]).await;
    let _persister = brokers.persister_ready(&mongo, &[]).await;
    brokers.cloud.stop().await;
    let stop = Arc::new(AtomicBool::new(false));
    let broker_pid = brokers.local.pid().expect("the edge broker runs");
    let peak = peak_rss(broker_pid, Arc::clone(&stop));

    let mut during = honest(&brokers, "honest-2", "300");
    let flooding = flood(
        brokers.local.port,
        "flood-2",
        password,
        "tele/flood-2/SENSOR",
    );
    during.expect_success().await;
    flooding.await.expect("the flood ran");
    stop.store(true, Ordering::Release);
    let peak = peak.await.expect("sampled");
    let refused = metric(
        metrics_port,
        "iot_relay_refused_total{reason=\"over_share\"}",
    )
    .await;
    eprintln!(
        "cloud down: edge broker peak {} MiB; relay refused {refused} of the flood's {FLOOD_COUNT}",
        peak >> 20
    );
    assert!(
        peak < BROKER_RSS,
        "the edge broker peaked at {} MiB",
        peak >> 20
    );
    assert!(refused > 0.0, "nothing of the flood was refused");
    assert_nothing_dropped(&brokers);

    assert!(brokers.cloud.start().await, "{}", brokers.cloud.log());
    let back = tokio::time::Instant::now();
    tests::wait_for_within(
        CATCH_UP,
        "every honest reading of the outage stored",
        || count(&db, doc! { "device": "honest-2" }),
        |stored| *stored >= 300,
    )
    .await;
    let drained = back.elapsed();
    assert_exactly_once(&stored_seqs(&db, "honest-2").await, 300);
    // Both are back (the outage's readings came through): a sensor started now is not
    // held behind the flood's backlog.
    let mut after = honest(&brokers, "honest-3", "200");
    after.expect_success().await;
    tests::wait_for_within(
        Duration::from_secs(60),
        "every honest reading after the outage stored",
        || count(&db, doc! { "device": "honest-3" }),
        |stored| *stored >= 200,
    )
    .await;
    assert_exactly_once(&stored_seqs(&db, "honest-3").await, 200);
    let slowest = slowest_ms(&db, "honest-3").await;
    eprintln!(
        "cloud back: the outage's honest readings stored {drained:?} after the cloud started; honest readings after: slowest {slowest} ms"
    );
    assert!(
        slowest <= HONEST_DELAY_MS,
        "an honest reading after the outage waited {slowest} ms"
    );
}

/// Each device account's largest message, as `add-device --max-message` set it (64K)
/// or by default (256K), the accounts added while the relay runs: a message of exactly that size is forwarded, one byte more is
/// acknowledged to the edge broker, not forwarded, and counted, and what the account
/// sends after it and an honest sensor beside it go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_accounts_message_past_its_limit_is_refused_and_the_rest_goes_on() {
    let (brokers, mongo) = (spawn_relay_brokers().await, spawn_mongo().await);
    let db = mongo.database().await;
    // The relay first: it reads the accounts added while it runs.
    let log_dir = brokers.dir().join("relay-log");
    let (_relay, metrics_port) = relay_with_metrics(&brokers, &log_dir, &[]).await;
    let cam_1 = brokers
        .local
        .add_device_with("cam-1", "tasmota", &["--max-message", "64K"]);
    let plain = brokers.local.add_device("cam-2", "tasmota");
    let _persister = brokers.persister_ready(&mongo, &[]).await;
    let mut watcher = TestClient::connect(brokers.cloud.port, "mqtt-subscriber").await;
    watcher.subscribe("tele/#").await;
    let mut sensor = honest(&brokers, "honest-4", "100");

    for (name, password, limit) in [
        ("cam-1", cam_1.clone(), 64 << 10),
        ("cam-2", plain, 256 << 10),
    ] {
        let mut device = brokers.local.log_in(name, &password).await;
        let topic = format!("tele/{name}/IMAGE");
        for (fill, size) in [(b'a', limit), (b'b', limit + 1), (b'c', limit)] {
            device
                .publish(&topic, QoS::AtLeastOnce, false, &vec![fill; size])
                .await;
        }
        for fill in [b'a', b'c'] {
            let message = watcher.next_message().await;
            assert_eq!(message.topic, topic);
            assert_eq!(message.payload.len(), limit, "{name}");
            assert!(message.payload.iter().all(|byte| *byte == fill), "{name}");
        }
    }
    sensor.expect_success().await;
    tests::wait_for_within(
        Duration::from_secs(60),
        "every honest reading stored",
        || count(&db, doc! { "device": "honest-4" }),
        |stored| *stored >= 100,
    )
    .await;
    assert_exactly_once(&stored_seqs(&db, "honest-4").await, 100);
    let refused = metric(
        metrics_port,
        "iot_relay_refused_total{reason=\"too_large\"}",
    )
    .await;
    assert!(
        (refused - 2.0).abs() < f64::EPSILON,
        "refused as too large: {refused}"
    );
    let acl = std::fs::read_to_string(brokers.local.conf_dir().join("acl")).expect("acl");
    // A limit past the broker's own, or no size at all: refused, nothing written.
    for size in ["3M", "2049K", "lots", "0"] {
        let output = std::process::Command::new(tests::repo_root().join("scripts/add-device"))
            .args(["cam-3", "--max-message", size, "--conf-dir"])
            .arg(brokers.local.conf_dir())
            .output()
            .expect("add-device runs");
        assert_eq!(output.status.code(), Some(2), "--max-message {size}");
        let after = std::fs::read_to_string(brokers.local.conf_dir().join("acl")).expect("acl");
        assert_eq!(after, acl, "--max-message {size} changed the ACL");
    }
    assert!(acl.contains("# max-message 65536"), "{acl}");
    assert!(acl.contains("# max-message 262144"), "{acl}");
    // Nothing refused came late: the next message the cloud has is a new one.
    let mut last = brokers.local.log_in("cam-1", &cam_1).await;
    last.publish("tele/cam-1/STATE", QoS::AtLeastOnce, false, b"{}")
        .await;
    let message = watcher.next_message().await;
    assert_eq!(message.topic, "tele/cam-1/STATE");
}

/// A relay started again during an outage counts what each account has in its log not
/// forwarded yet against its share before it takes anything: its shares started at zero
/// before, so each restart let a flooding account fill its share of the disk once more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_started_again_gives_no_account_its_share_a_second_time() {
    const SHARE: &str = "4M";
    const FIRST: usize = 40;
    const AFTER: usize = 10;
    let mut brokers = spawn_relay_brokers().await;
    let password = brokers.local.add_device("flood-4", "tasmota");
    let log_dir = brokers.dir().join("relay-log");
    let (mut relay, port) =
        relay_with_metrics(&brokers, &log_dir, &["--account-share", SHARE]).await;
    brokers.cloud.stop().await;
    let mut client = TestClient::try_connect_as(brokers.local.port, "flood-4", &password)
        .await
        .expect("the flooding account logs in");
    let payload = vec![b'x'; FLOOD_MESSAGE];
    let over_share = "iot_relay_refused_total{reason=\"over_share\"}";
    // 8 MB into a share of 4 MiB: about half of it is written, the rest refused.
    for _ in 0..FIRST {
        client
            .publish("tele/flood-4/SENSOR", QoS::AtLeastOnce, false, &payload)
            .await;
    }
    let taken = tests::wait_for(
        "the relay to write or refuse every message of the flood",
        || async {
            let logged = metric(port, "iot_relay_logged_total").await;
            (logged, metric(port, over_share).await)
        },
        |(logged, refused)| logged + refused >= FIRST as f64,
    )
    .await;
    assert!(taken.1 > 0.0, "nothing refused past the share: {taken:?}");
    relay.stop_cleanly().await;

    let (mut relay, port) = brokers
        .start_relay_with_metrics(&log_dir, &["--account-share", SHARE])
        .await;
    relay.wait_for_log("subscribed on the edge broker").await;
    relay
        .wait_for_log("not forwarded yet counted against their shares")
        .await;
    for _ in 0..AFTER {
        client
            .publish("tele/flood-4/SENSOR", QoS::AtLeastOnce, false, &payload)
            .await;
    }
    let refused = tests::wait_for(
        "the relay started again to refuse what is past the share",
        || metric(port, over_share),
        |refused| *refused >= AFTER as f64,
    )
    .await;
    let logged = metric(port, "iot_relay_logged_total").await;
    assert_eq!(
        (refused, logged),
        (AFTER as f64, 0.0),
        "the account's share, full before the restart, took more after it"
    );
    relay.stop_cleanly().await;
}
