//! The NATS JetStream cloud tier: three real `nats-server` nodes from
//! `scripts/nats-cluster`, the project's edge broker, and the real `edge-relay` and
//! `mongo-persister` binaries with `nats://` cloud addresses. The node leading the
//! stream is SIGKILLed mid-stream: every reading, with `(device, boot, seq)` or without,
//! is stored exactly once.

use std::time::Duration;

use bson::{doc, Document};
use futures_util::TryStreamExt;
use rumqttc::QoS;
use tests::nats::NatsCluster;
use tests::stored::{assert_exactly_once, stored_seqs};
use tests::{
    spawn_mongo, spawn_relay_brokers, wait_for, wait_for_within, Brokers, Service, TestClient,
};

/// Time allowed for the stream to elect a new leader and the backlog to drain.
const CATCH_UP: Duration = Duration::from_secs(90);
/// Keyed readings (the project's JSON form) and plain values streamed.
const KEYED: i64 = 8000;
const UNKEYED: u32 = 3000;
const UNKEYED_TOPIC: &str = "/sensor/plain-1/temperature";

/// A `temperature-sensor` publishing `count` JSON readings of `device` at QoS 1, about
/// one a millisecond (so that the kill falls within the stream).
fn start_paced_sensor(brokers: &Brokers, device: &str, count: &str) -> Service {
    let mut args = tests::stored::sensor_args(device, count);
    let at = args
        .iter()
        .position(|arg| arg == "--interval")
        .expect("interval")
        + 1;
    args[at] = "0.001".into();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    brokers.start_edge("temperature-sensor", &args)
}

/// Publishes the plain values 1..=`count` at QoS 1 to the edge broker, about one a
/// millisecond.
fn publish_unkeyed(port: u16, count: u32) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut device = TestClient::connect(port, "temperature-sensor").await;
        for value in 1..=count {
            device
                .publish(
                    UNKEYED_TOPIC,
                    QoS::AtLeastOnce,
                    false,
                    value.to_string().as_bytes(),
                )
                .await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
}

/// The plain values stored: how many of 1..=`count` at least once, and how many
/// documents in all.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reading_is_stored_once_through_the_loss_of_the_streams_leader() {
    let (brokers, mongo) = (spawn_relay_brokers().await, spawn_mongo().await);
    let mut cluster = NatsCluster::spawn(&["plant-1"]).await;
    let mut persister = cluster.start_persister(&brokers, &mongo, &["--no-repair"]);
    persister.wait_for_log("the NATS stream is set up").await;
    let log_dir = brokers.dir().join("relay-log");
    let mut relay = cluster.start_relay(&brokers, "plant-1", &log_dir, &[]);
    relay.wait_for_log("subscribed on the edge broker").await;
    let db = mongo.database().await;

    let mut sensor = start_paced_sensor(&brokers, "nats-1", &KEYED.to_string());
    let plain = publish_unkeyed(brokers.local.port, UNKEYED);
    wait_for(
        "1000 readings stored",
        || tests::stored::count(&db, doc! { "device": "nats-1" }),
        |n| *n >= 1000,
    )
    .await;
    assert!(sensor.is_running(), "the stream ended before the kill");
    let js = cluster.admin().await;
    let leader = wait_for(
        "the stream's leader",
        || cluster.stream_leader(&js),
        Option::is_some,
    )
    .await
    .expect("a leader");
    let killed_at = tests::stored::count(&db, doc! { "device": "nats-1" }).await;
    cluster.kill(leader).await;
    eprintln!(
        "SIGKILLed node-{} (the stream's leader) at {killed_at} readings stored",
        leader + 1
    );
    sensor.expect_success().await;
    plain.await.expect("the plain values published");

    let started = tokio::time::Instant::now();
    wait_for_within(
        CATCH_UP,
        "every keyed reading stored",
        || tests::stored::count(&db, doc! { "device": "nats-1" }),
        |n| *n >= KEYED as u64,
    )
    .await;
    let (distinct, stored) = wait_for_within(
        CATCH_UP,
        "every plain value stored",
        || unkeyed_stored(&db, UNKEYED),
        |(distinct, _)| *distinct == UNKEYED as usize,
    )
    .await;
    eprintln!(
        "everything stored {:?} after the streams ended",
        started.elapsed()
    );
    assert_exactly_once(&stored_seqs(&db, "nats-1").await, KEYED);
    assert_eq!(stored, distinct, "plain values stored twice");
    let new_leader = wait_for(
        "a new leader of the stream",
        || cluster.stream_leader(&js),
        Option::is_some,
    )
    .await;
    assert_ne!(new_leader, Some(leader));
    // A plain value's key is its place in the stream.
    let plain = db
        .collection::<Document>("readings")
        .find_one(doc! { "topic": UNKEYED_TOPIC })
        .await
        .expect("find")
        .expect("a plain value");
    let id = plain.get_document("_id").expect("a compound _id");
    assert_eq!(id.get_str("stream"), Ok(iot_core::nats::STREAM));

    relay.stop_cleanly().await;
    persister.stop_cleanly().await;
    // What the kill cost, for the log of the run: the relay's failed publishes sent
    // again, the persister's duplicates refused.
    for line in relay.stderr().lines().chain(persister.stderr().lines()) {
        if line.contains("NATS") || line.contains("duplicates=") {
            eprintln!("{line}");
        }
    }
}

/// The cluster's accounts as `scripts/nats-cluster` writes them: nobody gets in without
/// a password; a site's relay may publish into its own subject and nowhere else, and
/// may not change or remove the stream; the persister sets the stream up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_nats_user_may_do_only_its_own_job() {
    use async_nats::jetstream;
    use iot_core::nats::{ensure_stream, site_subject, NatsSettings, StreamSettings, STREAM};

    let cluster = NatsCluster::spawn(&["plant-1", "plant-2"]).await;
    let first = format!("nats://127.0.0.1:{}", cluster.ports[0]);
    assert!(
        async_nats::connect(first.as_str()).await.is_err(),
        "an anonymous client got in"
    );
    let wrong = async_nats::ConnectOptions::new()
        .user_and_password("edge-relay-plant-1".into(), "guess".into())
        .connect(first.as_str())
        .await;
    assert!(wrong.is_err(), "a wrong password got in");

    let admin = cluster.admin().await;
    let settings = StreamSettings::default();
    let stream = wait_for(
        "the persister's user to set up the stream",
        || ensure_stream(&admin, &settings),
        Result::is_ok,
    )
    .await
    .expect("the stream");
    assert_eq!(stream.config.num_replicas, 3);

    let relay = NatsSettings::parse(
        &cluster.address(),
        Some("edge-relay-plant-1".into()),
        Some(tests::password("edge-relay-plant-1")),
    )
    .expect("the address")
    .connect("test-relay")
    .await
    .expect("a client");
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(relay);
    let own = js
        .publish(site_subject("plant-1"), "1".into())
        .await
        .expect("sent")
        .await;
    assert!(own.is_ok(), "its own subject: {own:?}");
    let other = match js.publish(site_subject("plant-2"), "1".into()).await {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    };
    assert!(!other, "plant-1's relay published as plant-2");
    assert!(
        ensure_stream(
            &js,
            &StreamSettings {
                replicas: 1,
                ..StreamSettings::default()
            }
        )
        .await
        .is_err(),
        "a relay changed the stream"
    );
    assert!(
        js.delete_stream(STREAM).await.is_err(),
        "a relay removed the stream"
    );
    let mut stream = admin.get_stream(STREAM).await.expect("the stream");
    let info = stream.info().await.expect("its state");
    assert_eq!(info.state.messages, 1);
    assert_eq!(info.config.num_replicas, 3);
}

/// The relay SIGKILLed mid-stream and started again (it sends again what the stream
/// acknowledged after its last synced mark: refused there by message id), then the
/// persister SIGKILLed with a batch in hand and started again (the stream delivers the
/// unacknowledged messages again: refused by the database by `_id`, the stream sequence
/// for plain values): every reading stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_and_a_persister_killed_mid_stream_store_nothing_twice() {
    let (brokers, mongo) = (spawn_relay_brokers().await, spawn_mongo().await);
    let cluster = NatsCluster::spawn(&["plant-1"]).await;
    // What the killed persister held comes back within 5 s, not the default minute.
    let args = ["--no-repair", "--nats-ack-wait", "5s"];
    let mut persister = cluster.start_persister(&brokers, &mongo, &args);
    persister.wait_for_log("the NATS stream is set up").await;
    let log_dir = brokers.dir().join("relay-log");
    let mut relay = cluster.start_relay(&brokers, "plant-1", &log_dir, &[]);
    relay.wait_for_log("subscribed on the edge broker").await;
    let db = mongo.database().await;

    let mut sensor = start_paced_sensor(&brokers, "nats-2", &KEYED.to_string());
    let plain = publish_unkeyed(brokers.local.port, UNKEYED);
    let stored = |n: u64| {
        let db = db.clone();
        async move {
            wait_for(
                &format!("{n} readings stored"),
                || tests::stored::count(&db, doc! { "device": "nats-2" }),
                |stored| *stored >= n,
            )
            .await
        }
    };
    stored(1000).await;
    relay.kill().await;
    let mut relay = cluster.start_relay(&brokers, "plant-1", &log_dir, &[]);
    relay.wait_for_log("subscribed on the edge broker").await;
    stored(3000).await;
    assert!(sensor.is_running(), "the stream ended before the kills");
    persister.kill().await;
    let mut persister = cluster.start_persister(&brokers, &mongo, &args);
    sensor.expect_success().await;
    plain.await.expect("the plain values published");

    wait_for_within(
        CATCH_UP,
        "every keyed reading stored",
        || tests::stored::count(&db, doc! { "device": "nats-2" }),
        |n| *n >= KEYED as u64,
    )
    .await;
    let (distinct, stored) = wait_for_within(
        CATCH_UP,
        "every plain value stored",
        || unkeyed_stored(&db, UNKEYED),
        |(distinct, _)| *distinct == UNKEYED as usize,
    )
    .await;
    assert_exactly_once(&stored_seqs(&db, "nats-2").await, KEYED);
    assert_eq!(stored, distinct, "plain values stored twice");
    relay.stop_cleanly().await;
    persister.stop_cleanly().await;
    for line in persister.stderr().lines() {
        if line.contains("duplicates=") {
            eprintln!("{line}");
        }
    }
}

/// A stream full of what no persister took yet (`--nats-max-bytes`, `discard new`)
/// refuses new messages: the relay keeps them in its log and sends them again until the
/// stream has room; the persister back, every reading should be stored once.
///
/// Ignored: it fails on nats-server 2.9.10. The relay is refused ("maximum bytes
/// exceeded") and sends again as it should, yet 1 to 37 of the 2 000 readings, the
/// oldest ones, are gone: in one run the stream had taken 2 000 messages (last sequence
/// 2 000), the consumer had delivered 1 999 and the stream was empty with nothing
/// pending. With a window of publishes in flight, the clustered stream seems to take
/// one past its limit and the file store then removes its oldest message, discard new
/// or not. Until that is settled, keep --nats-max-bytes far above any backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "nats-server 2.9.10 drops the oldest messages of a full clustered stream (see above)"]
async fn a_full_stream_holds_the_relay_back_and_loses_nothing() {
    let (brokers, mongo) = (spawn_relay_brokers().await, spawn_mongo().await);
    let cluster = NatsCluster::spawn(&["plant-1"]).await;
    // The persister stopped first may leave pull requests the stream answers after it
    // left: those messages come back after the ack wait, 5 s here.
    let args = [
        "--no-repair",
        "--nats-max-bytes",
        "200K",
        "--nats-ack-wait",
        "5s",
    ];
    let mut persister = cluster.start_persister(&brokers, &mongo, &args);
    persister.wait_for_log("the NATS stream is set up").await;
    persister.stop_cleanly().await;
    let log_dir = brokers.dir().join("relay-log");
    let mut relay = cluster.start_relay(&brokers, "plant-1", &log_dir, &[]);
    relay.wait_for_log("subscribed on the edge broker").await;

    // About 300 KB of JSON readings for a stream of 200 KB.
    let count = 2000;
    tests::stored::start_sensor(&brokers, "full-1", &count.to_string())
        .expect_success()
        .await;
    relay
        .wait_for_log("publishing into the NATS stream failed")
        .await;
    let refused = relay.stderr();
    let refused = refused
        .lines()
        .find(|line| line.contains("publishing into the NATS stream failed"))
        .unwrap_or_default();
    assert!(refused.contains("maximum bytes"), "{refused}");
    let mut persister = cluster.start_persister(&brokers, &mongo, &args);
    let db = mongo.database().await;
    wait_for_within(
        CATCH_UP,
        "every reading stored",
        || tests::stored::count(&db, doc! { "device": "full-1" }),
        |n| *n >= count,
    )
    .await;
    assert_exactly_once(&stored_seqs(&db, "full-1").await, count as i64);
    relay.stop_cleanly().await;
    persister.stop_cleanly().await;
}

/// The cluster with TLS for clients (`NATS_CERTS_DIR`, certificates from
/// `mosquitto/certs.sh`): the relay and the persister, given the CA (`CLOUD_TLS_CA`),
/// carry readings through it; a client without that CA is refused at the handshake
/// (the nodes' certificates are not trusted by default), as is a relay given a CA file
/// that is not there (one line, exit 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_speaks_tls_to_its_clients_and_readings_cross_it() {
    let (brokers, mongo) = (spawn_relay_brokers().await, spawn_mongo().await);
    let cluster = NatsCluster::spawn_tls(&["plant-1"]).await;
    let first = format!("nats://127.0.0.1:{}", cluster.ports[0]);
    let untrusted = async_nats::ConnectOptions::new()
        .user_and_password("mongo-persister".into(), tests::password("mongo-persister"))
        .connect(first.as_str())
        .await;
    assert!(
        untrusted.is_err(),
        "a client that does not trust the cluster's CA got in"
    );

    let mut persister = cluster.start_persister(&brokers, &mongo, &["--no-repair"]);
    persister.wait_for_log("the NATS stream is set up").await;
    let log_dir = brokers.dir().join("relay-log");
    let mut relay = cluster.start_relay(&brokers, "plant-1", &log_dir, &[]);
    relay.wait_for_log("subscribed on the edge broker").await;
    assert!(
        relay.stderr().contains("(TLS)"),
        "the relay does not say it speaks TLS:\n{}",
        relay.stderr()
    );
    let db = mongo.database().await;
    let mut sensor = brokers.start_edge(
        "temperature-sensor",
        &tests::stored::sensor_args("nats-tls", "200")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    sensor.expect_success().await;
    wait_for(
        "200 readings stored through TLS",
        || tests::stored::count(&db, doc! { "device": "nats-tls" }),
        |n| *n >= 200,
    )
    .await;
    assert_exactly_once(&stored_seqs(&db, "nats-tls").await, 200);
    relay.stop_cleanly().await;
    persister.stop_cleanly().await;

    let missing = brokers.dir().join("no-such-ca.crt");
    let mut command = tests::service_command(
        "edge-relay",
        brokers.dir(),
        brokers.local.port,
        Some("edge-relay"),
        &[],
        &[
            ("CLOUD_BROKER", cluster.address()),
            ("CLOUD_TLS_CA", missing.display().to_string()),
            ("RELAY_LOG_DIR", log_dir.display().to_string()),
        ],
    );
    let output = command.output().await.expect("edge-relay ran");
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("CLOUD_TLS_CA"), "{stderr}");
}
