//! The NATS JetStream cloud tier: three real `nats-server` nodes from
//! `scripts/nats-cluster`, the project's edge broker, and the real `edge-relay` and
//! `mongo-persister` binaries with `nats://` cloud addresses. The node leading the
//! stream is SIGKILLed mid-stream: every reading, with `(device, boot, seq)` or without,
//! is stored exactly once. Requests go the other way over NATS: a hole in the stream
//! asked of the site and filled from the relay's log, the Sparkplug host's Rebirth and
//! STATE carried to the edge.

// Each test is one scenario, read top to bottom: the services' 80-line bound
// (clippy.toml) is not for them.
#![allow(clippy::too_many_lines)]

use std::time::Duration;

use bson::{doc, Document};
use futures_util::TryStreamExt;
use rumqttc::QoS;
use tests::nats::{NatsCluster, CLUSTER_WAIT};
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
    start_sensor_every(brokers, device, count, "0.001")
}

/// The same, one reading every `interval` seconds.
fn start_sensor_every(brokers: &Brokers, device: &str, count: &str, interval: &str) -> Service {
    let mut args = tests::stored::sensor_args(device, count);
    let at = args
        .iter()
        .position(|arg| arg == "--interval")
        .expect("interval")
        + 1;
    args[at] = interval.into();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    brokers.start_edge("temperature-sensor", &args)
}

/// Publishes the plain values 1..=`count` at QoS 1 to the edge broker, about one a
/// millisecond.
fn publish_unkeyed(port: u16, count: u32) -> tokio::task::JoinHandle<()> {
    publish_unkeyed_every(port, count, Duration::from_millis(1))
}

/// The same, one every `interval`.
fn publish_unkeyed_every(port: u16, count: u32, interval: Duration) -> tokio::task::JoinHandle<()> {
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
            tokio::time::sleep(interval).await;
        }
    })
}

/// Plain values 1..=`count` on `topic`, as fast as the edge broker takes them.
fn plain_values(port: u16, topic: &'static str, count: u32) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut device = TestClient::connect(port, "temperature-sensor").await;
        for value in 1..=count {
            let payload = value.to_string();
            device
                .publish(topic, QoS::AtLeastOnce, false, payload.as_bytes())
                .await;
        }
    })
}

/// The plain values stored: how many of 1..=`count` at least once, and how many
/// documents in all.
async fn unkeyed_stored(db: &mongodb::Database, count: u32) -> (usize, usize) {
    values_stored(db, UNKEYED_TOPIC, count).await
}

/// As [`unkeyed_stored`], on `topic`.
async fn values_stored(db: &mongodb::Database, topic: &str, count: u32) -> (usize, usize) {
    let documents: Vec<Document> = db
        .collection::<Document>("readings")
        .find(doc! { "topic": topic })
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

/// One sample of a service's `/metrics` on `port`, if it answers and has it.
async fn metric(port: u16, name: &str) -> Option<f64> {
    let (_, text) = tests::prometheus::get(port, "/metrics").await;
    tests::prometheus::sample(&text, name)
}

/// What most tests here start from, each part ready: an edge broker, a database, three
/// nodes with plant-1's account, a persister with `persister_args`, plant-1's relay.
struct Pipeline {
    brokers: Brokers,
    mongo: tests::MongoServer,
    cluster: NatsCluster,
    persister: Service,
    relay: Service,
    log_dir: std::path::PathBuf,
}

async fn spawn_pipeline(persister_args: &[&str]) -> Pipeline {
    let (brokers, mongo) = (spawn_relay_brokers().await, spawn_mongo().await);
    let cluster = NatsCluster::spawn(&["plant-1"]).await;
    let persister = cluster
        .persister_ready(&brokers, &mongo, persister_args)
        .await;
    let log_dir = brokers.dir().join("relay-log");
    let relay = cluster
        .relay_ready(&brokers, "plant-1", &log_dir, &[])
        .await;
    Pipeline {
        brokers,
        mongo,
        cluster,
        persister,
        relay,
        log_dir,
    }
}

/// Waits until every keyed reading 1..=`keyed` of `device` and every plain value
/// 1..=`plain` is stored, then asserts each was stored once.
async fn assert_all_stored_once(db: &mongodb::Database, device: &str, keyed: i64, plain: u32) {
    wait_for_within(
        CATCH_UP,
        "every keyed reading stored",
        || tests::stored::count(db, doc! { "device": device }),
        |n| *n >= keyed as u64,
    )
    .await;
    let (distinct, stored) = wait_for_within(
        CATCH_UP,
        "every plain value stored",
        || unkeyed_stored(db, plain),
        |(distinct, _)| *distinct == plain as usize,
    )
    .await;
    assert_exactly_once(&stored_seqs(db, device).await, keyed);
    assert_eq!(stored, distinct, "plain values stored twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reading_is_stored_once_through_the_loss_of_the_streams_leader() {
    let Pipeline {
        brokers,
        mongo,
        mut cluster,
        mut persister,
        mut relay,
        ..
    } = spawn_pipeline(&["--no-repair"]).await;
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
    assert_all_stored_once(&db, "nats-1", KEYED, UNKEYED).await;
    eprintln!(
        "everything stored {:?} after the streams ended",
        started.elapsed()
    );
    let new_leader = wait_for(
        "a new leader of the stream",
        || cluster.stream_leader(&js),
        Option::is_some,
    )
    .await;
    assert_ne!(new_leader, Some(leader));
    // A plain value's key is the relay's: its site and its message id.
    let plain = db
        .collection::<Document>("readings")
        .find_one(doc! { "topic": UNKEYED_TOPIC })
        .await
        .expect("find")
        .expect("a plain value");
    let id = plain.get_document("_id").expect("a compound _id");
    // The relay's id one-way: nothing in the database to forge another relay's with.
    assert_eq!(id.get_str("site"), Ok("plant-1"));
    assert!(
        id.get_str("msg")
            .is_ok_and(|msg| msg.len() == 32 && !msg.contains(':')),
        "{id}"
    );

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

/// The other readings without `(device, boot, seq)`: a preset's JSON (Tasmota's SENSOR)
/// and Sparkplug B metrics (one by alias in each NDATA, after the node's birth), streamed
/// while the stream's leader is SIGKILLed: each stored once, the JSON keyed by the
/// relay's message id as plain values are, a metric by its node, name and timestamp.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_presets_json_and_sparkplug_metrics_are_stored_once_through_the_loss_of_the_leader() {
    use tests::sparkplug::{bd_seq, by_alias, encode, tag};
    const EACH: u32 = 5000;
    const TASMOTA: &str = "tele/tasmota-1/SENSOR";
    const NDATA: &str = "spBv1.0/cell/NDATA/line-9";
    let (brokers, mongo) = (spawn_relay_brokers().await, spawn_mongo().await);
    let tasmota = brokers.local.add_device("tasmota-1", "tasmota");
    let sparkplug = brokers.local.add_device("line-9", "sparkplug");
    let mut cluster = NatsCluster::spawn(&["plant-1"]).await;
    let args = [
        "--no-repair",
        "--ingest",
        "tasmota,sparkplug",
        "--sparkplug-host-id",
        "scada-9",
    ];
    let mut persister = cluster.persister_ready(&brokers, &mongo, &args).await;
    let log_dir = brokers.dir().join("relay-log");
    let mut relay = cluster
        .relay_ready(&brokers, "plant-1", &log_dir, &[])
        .await;
    let db = mongo.database().await;
    let port = brokers.local.port;

    let mut node = TestClient::try_connect_as(port, "line-9", &sparkplug)
        .await
        .expect("the node's account logs in");
    let birth = encode(Some(0), vec![tag(Some("Tag/1".into()), 1, 0.0), bd_seq(1)]);
    node.publish(
        "spBv1.0/cell/NBIRTH/line-9",
        QoS::AtLeastOnce,
        false,
        &birth,
    )
    .await;
    let node = tokio::spawn(async move {
        for value in 1..=EACH {
            let data = by_alias(u64::from(value % 256), 1, f64::from(value));
            node.publish(NDATA, QoS::AtLeastOnce, false, &data).await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    let mut device = TestClient::try_connect_as(port, "tasmota-1", &tasmota)
        .await
        .expect("the Tasmota account logs in");
    let device = tokio::spawn(async move {
        for value in 1..=EACH {
            // x.5: a float, read back as x.
            let payload = format!(
                r#"{{"Time":"2026-12-08T10:00:00","DS18B20":{{"Temperature":{value}.5}},"TempUnit":"C"}}"#
            );
            device
                .publish(TASMOTA, QoS::AtLeastOnce, false, payload.as_bytes())
                .await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    let both = || async {
        (
            values_stored(&db, TASMOTA, EACH).await.0,
            values_stored(&db, NDATA, EACH).await.0,
        )
    };
    let at = wait_for_within(CATCH_UP, "500 of each stored", both, |(json, metrics)| {
        *json >= 500 && *metrics >= 500
    })
    .await;
    let js = cluster.admin().await;
    let leader = wait_for(
        "the stream's leader",
        || cluster.stream_leader(&js),
        Option::is_some,
    )
    .await
    .expect("a leader");
    assert!(
        !node.is_finished() && !device.is_finished(),
        "the streams ended before the kill"
    );
    cluster.kill(leader).await;
    eprintln!(
        "SIGKILLed node-{} (the stream's leader) at {at:?} stored",
        leader + 1
    );
    node.await.expect("the node's data published");
    device.await.expect("the Tasmota readings published");

    let all = EACH as usize;
    wait_for_within(CATCH_UP, "every value stored", both, |(json, metrics)| {
        *json == all && *metrics == all
    })
    .await;
    for topic in [TASMOTA, NDATA] {
        let (distinct, stored) = values_stored(&db, topic, EACH).await;
        assert_eq!(stored, distinct, "{topic}: values stored twice");
        // Keyed by the relay's message id, which a copy keeps.
        let one = db
            .collection::<Document>("readings")
            .find_one(doc! { "topic": topic })
            .await
            .expect("find")
            .expect("a reading");
        let id = one.get_document("_id").expect("a compound _id");
        if topic == TASMOTA {
            assert_eq!(id.get_str("site"), Ok("plant-1"), "{topic}: {id}");
            assert!(id.get_str("msg").is_ok(), "{topic}: {id}");
        } else {
            // A Sparkplug metric has a key of its own: node, metric and timestamp.
            assert_eq!(id.get_str("device"), Ok("cell/line-9"), "{topic}: {id}");
            assert_eq!(id.get_str("measurement"), Ok("Tag/1"), "{topic}: {id}");
        }
    }
    relay.stop_cleanly().await;
    persister.stop_cleanly().await;
}

/// Each node SIGKILLed in turn while keyed readings and plain values stream through the
/// cluster, each started again and current before the next goes: every reading stored
/// once, every plain value too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_node_killed_in_turn_loses_nothing_and_stores_nothing_twice() {
    // Long enough (a minute at least) for three kills and restarts on a loaded machine.
    const EACH_KEYED: i64 = 24_000;
    const EACH_PLAIN: u32 = 10_000;
    let Pipeline {
        brokers,
        mongo,
        mut cluster,
        mut persister,
        mut relay,
        ..
    } = spawn_pipeline(&["--no-repair"]).await;
    let db = mongo.database().await;

    let mut sensor = start_sensor_every(&brokers, "turns-1", &EACH_KEYED.to_string(), "0.002");
    let plain = publish_unkeyed_every(brokers.local.port, EACH_PLAIN, Duration::from_millis(5));
    let stored = || tests::stored::count(&db, doc! { "device": "turns-1" });
    wait_for_within(CATCH_UP, "1500 readings stored", stored, |n| *n >= 1500).await;
    for node in 0..3 {
        assert!(
            sensor.is_running(),
            "the stream ended before node-{} went",
            node + 1
        );
        let at = stored().await;
        cluster.kill(node).await;
        eprintln!("SIGKILLed node-{} at {at} readings stored", node + 1);
        // The other two carry the stream meanwhile.
        wait_for_within(CATCH_UP, "readings stored with a node down", stored, |n| {
            *n >= at + 500
        })
        .await;
        cluster.restart(node).await;
    }
    let status = sensor.wait_exit_within(CATCH_UP).await;
    assert!(status.success(), "{}", sensor.stderr());
    plain.await.expect("the plain values published");
    assert_all_stored_once(&db, "turns-1", EACH_KEYED, EACH_PLAIN).await;
    relay.stop_cleanly().await;
    persister.stop_cleanly().await;
}

/// Every node SIGKILLed under a relay and a persister that carried a stream: both stop
/// at SIGTERM, cleanly and within the harness's wait (the persister waited without end
/// for a flush to the cluster that was gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_and_the_persister_stop_with_the_whole_cluster_down() {
    let Pipeline {
        brokers,
        mongo,
        mut cluster,
        mut persister,
        mut relay,
        ..
    } = spawn_pipeline(&["--no-repair"]).await;
    let db = mongo.database().await;
    start_sensor_every(&brokers, "gone-1", "200", "0.002")
        .expect_success()
        .await;
    wait_for_within(
        CATCH_UP,
        "the readings stored",
        || tests::stored::count(&db, doc! { "device": "gone-1" }),
        |n| *n >= 200,
    )
    .await;
    for node in 0..3 {
        cluster.kill(node).await;
    }
    // More for the relay to hold, with nowhere to send them.
    start_sensor_every(&brokers, "gone-2", "50", "0.002")
        .expect_success()
        .await;
    persister.stop_cleanly().await;
    relay.stop_cleanly().await;
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
/// unacknowledged messages again: refused by the database by `_id`, the relay's message
/// id for plain values): every reading stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_and_a_persister_killed_mid_stream_store_nothing_twice() {
    // What the killed persister held comes back within 5 s, not the default minute.
    let args = ["--no-repair", "--nats-ack-wait", "5s"];
    let Pipeline {
        brokers,
        mongo,
        cluster,
        mut persister,
        mut relay,
        log_dir,
    } = spawn_pipeline(&args).await;
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
    let mut relay = cluster
        .relay_ready(&brokers, "plant-1", &log_dir, &[])
        .await;
    stored(3000).await;
    // The persister killed with readings still to store (the device itself may be done
    // by then on a loaded machine: what it sent waits in the stream).
    let before = tests::stored::count(&db, doc! { "device": "nats-2" }).await;
    assert!(
        before < KEYED as u64,
        "every reading was stored before the persister's kill"
    );
    persister.kill().await;
    let mut persister = cluster.start_persister(&brokers, &mongo, &args);
    sensor.expect_success().await;
    plain.await.expect("the plain values published");

    assert_all_stored_once(&db, "nats-2", KEYED, UNKEYED).await;
    relay.stop_cleanly().await;
    persister.stop_cleanly().await;
    for line in persister.stderr().lines() {
        if line.contains("duplicates=") {
            eprintln!("{line}");
        }
    }
}

/// Two persister replicas share the stream. The node one of them reads from and the
/// other replica SIGKILLed at once, mid-stream: the survivor reads on from another node
/// and takes the whole stream, what the killed replica held included (delivered again
/// after the ack wait); every reading stored once. Nothing is retired or reconfigured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_and_the_node_the_other_reads_from_killed_at_once_store_everything_once() {
    let (brokers, mongo) = (spawn_relay_brokers().await, spawn_mongo().await);
    let mut cluster = NatsCluster::spawn(&["plant-1"]).await;
    let metrics = [tests::free_port(), tests::free_port()];
    let mut replicas = Vec::new();
    for port in metrics {
        let address = format!("127.0.0.1:{port}");
        let args = [
            "--no-repair",
            "--nats-ack-wait",
            "5s",
            "--metrics-address",
            &address,
        ];
        replicas.push(cluster.persister_ready(&brokers, &mongo, &args).await);
    }
    let [mut killed, mut survivor] = <[Service; 2]>::try_from(replicas).expect("two replicas");
    let log_dir = brokers.dir().join("relay-log");
    let mut relay = cluster
        .relay_ready(&brokers, "plant-1", &log_dir, &[])
        .await;
    let db = mongo.database().await;
    let written = |port: u16| async move {
        metric(port, "iot_persister_documents_written_total")
            .await
            .unwrap_or(0.0)
    };

    let mut sensor = start_paced_sensor(&brokers, "nats-3", &KEYED.to_string());
    let plain = publish_unkeyed(brokers.local.port, UNKEYED);
    // Each replica takes its share of the stream.
    let shares = wait_for(
        "both replicas writing",
        || async { (written(metrics[0]).await, written(metrics[1]).await) },
        |(killed, survivor)| *killed > 0.0 && *survivor > 0.0,
    )
    .await;
    let pid = survivor.pid().expect("the survivor runs");
    let node = wait_for(
        "the survivor's node (the nodes' /connz)",
        || cluster.node_of(pid),
        Option::is_some,
    )
    .await
    .expect("a node");
    let before = tests::stored::count(&db, doc! { "device": "nats-3" }).await;
    assert!(
        before < KEYED as u64,
        "every reading was stored before the kills"
    );
    tokio::join!(cluster.kill(node), killed.kill());
    let from = written(metrics[1]).await;
    eprintln!(
        "SIGKILLed node-{} (the survivor's) and the other replica at {before} readings stored, \
         the replicas' shares {shares:?}",
        node + 1
    );
    sensor.expect_success().await;
    plain.await.expect("the plain values published");

    assert_all_stored_once(&db, "nats-3", KEYED, UNKEYED).await;
    // On a node that runs: the killed one answers nobody's /connz.
    let now = wait_for(
        "the survivor on another node",
        || cluster.node_of(pid),
        Option::is_some,
    )
    .await;
    let after = written(metrics[1]).await;
    assert!(
        after > from,
        "the survivor wrote nothing after the kills ({from} then {after})"
    );
    // What the killed replica held, unacknowledged, came to the survivor after the ack
    // wait (a replica holds a pull's worth ahead at any time).
    let again = metric(metrics[1], "iot_persister_nats_redeliveries_total").await;
    assert!(
        again.is_some_and(|again| again > 0.0),
        "nothing handed to the survivor again: {again:?}"
    );
    eprintln!(
        "the survivor wrote {} documents after the kills, from node-{}; {again:?} handed to it again",
        after - from,
        now.map_or(0, |n| n + 1)
    );
    relay.stop_cleanly().await;
    survivor.stop_cleanly().await;
}

/// The database down: the consumer hands a persister at most `--nats-max-ack-pending`
/// messages not acknowledged, the rest waits in the stream, and the persister's metrics
/// say so (the stream's messages, the consumer's lag, what it handed out). Handed out
/// again after `--nats-ack-wait` while the database is still down, they wait in the
/// persister's queue, which stays within its bound (4 batches). The database back:
/// every value stored once, the stream and the lag back to nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_database_down_a_persister_holds_at_most_its_max_ack_pending() {
    const SENT: u32 = 1000;
    const HELD: f64 = 100.0;
    const TOPIC: &str = "/sensor/held-1/temperature";
    let brokers = spawn_relay_brokers().await;
    let Some(mut mongo) = tests::spawn_stoppable_mongo().await else {
        return;
    };
    let cluster = NatsCluster::spawn(&["plant-1"]).await;
    let metrics = tests::free_port();
    let address = format!("127.0.0.1:{metrics}");
    let args = [
        "--no-repair",
        "--nats-max-ack-pending",
        "100",
        "--nats-ack-wait",
        "2s",
        "--batch-size",
        "50",
        "--metrics-address",
        &address,
    ];
    let mut persister = cluster.persister_ready(&brokers, &mongo, &args).await;
    let log_dir = brokers.dir().join("relay-log");
    let mut relay = cluster
        .relay_ready(&brokers, "plant-1", &log_dir, &[])
        .await;
    let db = mongo.database().await;
    // (messages in the stream, not handed out yet, handed out and not acknowledged,
    // handed out again to this persister)
    let figures = || async move {
        let (_, text) = tests::prometheus::get(metrics, "/metrics").await;
        let figure = |name| tests::prometheus::sample(&text, name).unwrap_or(-1.0);
        (
            figure("iot_persister_nats_stream_messages"),
            figure("iot_persister_nats_consumer_pending"),
            figure("iot_persister_nats_consumer_ack_pending"),
            figure("iot_persister_nats_redeliveries_total"),
        )
    };
    let queued = || async move {
        metric(metrics, "iot_persister_queued_documents")
            .await
            .unwrap_or(-1.0)
    };

    mongo.stop().await;
    plain_values(brokers.local.port, TOPIC, SENT)
        .await
        .expect("the plain values published");
    let sent = f64::from(SENT);
    let (_, pending, handed_out, _) = wait_for(
        "every value in the stream, the persister handed its share",
        figures,
        |(stream, pending, handed_out, _)| {
            *stream == sent && *handed_out > 0.0 && *pending + *handed_out == sent
        },
    )
    .await;
    assert!(
        handed_out <= HELD,
        "{handed_out} handed out for --nats-max-ack-pending 100"
    );
    persister.wait_for_log("cannot write to MongoDB").await;
    // Past the ack wait, what it holds is handed out again: its queue takes the copies
    // up to its bound of 4 batches (50 documents each here), and reads no more.
    let (.., again) = wait_for(
        "messages handed out again while the database is down",
        figures,
        |(.., again)| *again > 0.0,
    )
    .await;
    let most = queued().await;
    assert!(
        (0.0..=200.0).contains(&most),
        "{most} documents queued for a bound of 200"
    );
    eprintln!(
        "the database down: {pending} waiting in the stream, {handed_out} handed out, \
         {again} handed out again, {most} documents queued"
    );

    assert!(
        mongo.start().await,
        "MongoDB did not come back: {}",
        mongo.log()
    );
    let (distinct, stored) = wait_for_within(
        CATCH_UP,
        "every value stored",
        || values_stored(&db, TOPIC, SENT),
        |(distinct, _)| *distinct == SENT as usize,
    )
    .await;
    assert_eq!(stored, distinct, "values stored twice");
    wait_for(
        "the stream and the lag back to nothing",
        figures,
        |(stream, pending, handed_out, _)| *stream == 0.0 && *pending == 0.0 && *handed_out == 0.0,
    )
    .await;
    relay.stop_cleanly().await;
    persister.stop_cleanly().await;
}

/// A persister's flags for a stream of 200 KB that it fills: the persister stopped
/// first may leave pull requests the stream answers after it left, and those messages
/// come back after the ack wait, 5 s here.
const SMALL_STREAM: [&str; 5] = [
    "--no-repair",
    "--nats-max-bytes",
    "200K",
    "--nats-ack-wait",
    "5s",
];

/// A stream full of what no persister took yet takes no more: the relay keeps the rest
/// in its log until the stream has room; the persister back, every reading is stored
/// once. nats-server 2.10.5 and later refuse past the stream's `max_bytes`. Before
/// (Debian's is 2.9.10) the server takes a message past the limit and removes the
/// oldest to make room (nats-io/nats-server#4775: 1 to 37 of these 2 000 readings were
/// gone), so there the relay holds its log while the stream is within a tenth of its
/// limit. (An account limit instead, `max_file`, lost 44 of them: each replica checks it
/// again after storing and removes the message when its own view of the others' usage
/// says past, so the replicas differ and the consumer passed over messages the stream
/// still held.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_stream_holds_the_relay_back_and_loses_nothing() {
    let (brokers, mongo) = (spawn_relay_brokers().await, spawn_mongo().await);
    let cluster = NatsCluster::spawn(&["plant-1"]).await;
    let version = cluster.server_version().await;
    let args = SMALL_STREAM;
    let mut persister = cluster.persister_ready(&brokers, &mongo, &args).await;
    persister.stop_cleanly().await;
    let log_dir = brokers.dir().join("relay-log");
    let mut relay = cluster
        .relay_ready(&brokers, "plant-1", &log_dir, &[])
        .await;

    // About 300 KB of JSON readings for a stream of 200 KB.
    let count = 2000;
    tests::stored::start_sensor(&brokers, "full-1", &count.to_string())
        .expect_success()
        .await;
    if iot_core::nats::holds_max_bytes(&version) {
        relay
            .wait_for_log("publishing into the NATS stream failed")
            .await;
        let refused = relay.stderr();
        let refused = refused
            .lines()
            .find(|line| line.contains("publishing into the NATS stream failed"))
            .unwrap_or_default();
        assert!(refused.contains("maximum bytes"), "{refused}");
    } else {
        relay.wait_for_log("the NATS stream is filling up").await;
        let js = cluster.admin().await;
        let mut stream = js
            .get_stream(iot_core::nats::STREAM)
            .await
            .expect("the stream");
        let info = stream.info().await.expect("its state");
        assert!(
            info.state.bytes <= 200 * 1024,
            "nats-server {version}: the stream holds {} bytes past its 200K",
            info.state.bytes
        );
    }
    let mut persister = cluster.start_persister(&brokers, &mongo, &args);
    let db = mongo.database().await;
    let all = tokio::time::timeout(CATCH_UP, async {
        while tests::stored::count(&db, doc! { "device": "full-1" }).await < count {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    if all.is_err() {
        let seqs = stored_seqs(&db, "full-1").await;
        let missing: Vec<i64> = (1..=count as i64)
            .filter(|seq| !seqs.iter().any(|(_, stored)| stored == seq))
            .collect();
        eprintln!("missing: {missing:?}\n{}", cluster.describe().await);
        eprintln!(
            "relay:\n{}\npersister:\n{}",
            relay.stderr(),
            persister.stderr()
        );
    }
    assert_exactly_once(&stored_seqs(&db, "full-1").await, count as i64);
    relay.stop_cleanly().await;
    persister.stop_cleanly().await;
}

/// Two sites' relays flooding a 200 KB stream with no persister reading it: together
/// they keep within it (on nats-server before 2.10.5 each takes only its share of the
/// room left between two reads of the stream's bytes; there, past the limit, the
/// server would remove the oldest messages), and once a persister reads again every
/// plain value of both sites is stored once. Before the shares, 11 and 12 of these
/// 4 000 were gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sites_flooding_a_full_stream_lose_nothing() {
    const EACH: u32 = 2000;
    let (brokers, mongo) = (spawn_relay_brokers().await, spawn_mongo().await);
    let second_edge = brokers.spawn_relay_site("plant-2").await;
    let cluster = NatsCluster::spawn(&["plant-1", "plant-2"]).await;
    let args = SMALL_STREAM;
    let mut persister = cluster.persister_ready(&brokers, &mongo, &args).await;
    persister.stop_cleanly().await;
    let mut relays = Vec::new();
    let sites = [
        ("plant-1", &brokers.local, "/sensor/flood-1/temperature"),
        ("plant-2", &second_edge, "/sensor/flood-2/temperature"),
    ];
    for (site, edge, _) in sites {
        let log_dir = brokers.dir().join(format!("relay-log-{site}"));
        let relay = cluster.start_relay_at(&brokers, edge, site, &log_dir, &[]);
        relay
            .wait_for_log_within(CLUSTER_WAIT, "subscribed on the edge broker")
            .await;
        relays.push(relay);
    }
    let floods: Vec<_> = sites
        .iter()
        .map(|(_, edge, topic)| plain_values(edge.port, topic, EACH))
        .collect();
    for flood in floods {
        flood.await.expect("the plain values published");
    }
    // About 2 × 320 KB in the stream: both relays hold what is left.
    if iot_core::nats::holds_max_bytes(&cluster.server_version().await) {
        for relay in &relays {
            relay
                .wait_for_log("publishing into the NATS stream failed")
                .await;
        }
    } else {
        for relay in &relays {
            relay.wait_for_log("the NATS stream is filling up").await;
        }
    }
    let js = cluster.admin().await;
    let mut stream = js
        .get_stream(iot_core::nats::STREAM)
        .await
        .expect("the stream");
    let held = stream.info().await.expect("its state").state.clone();
    assert_eq!(
        held.first_sequence, 1,
        "the stream removed messages: {held:?}"
    );

    let mut persister = cluster.start_persister(&brokers, &mongo, &args);
    let db = mongo.database().await;
    for (_, _, topic) in sites {
        let (distinct, stored) = wait_for_within(
            CATCH_UP,
            &format!("every plain value of {topic} stored"),
            || values_stored(&db, topic, EACH),
            |(distinct, _)| *distinct == EACH as usize,
        )
        .await;
        assert_eq!(stored, distinct, "{topic}: plain values stored twice");
    }
    for mut relay in relays {
        relay.stop_cleanly().await;
    }
    persister.stop_cleanly().await;
}

/// A relay's log restored from a copy (a backup, a virtual machine cloned with it) gives
/// numbers again that the cloud already has messages under: each start of the relay
/// writes under a run id of its own, so what it takes after the restore is new to the
/// stream and to the database. Before, the stream refused all 100 plain values taken
/// after the restore as copies, and the database would have refused them for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_log_restored_from_a_copy_loses_nothing_it_takes_after() {
    let (brokers, mongo) = (spawn_relay_brokers().await, spawn_mongo().await);
    let cluster = NatsCluster::spawn(&["plant-1"]).await;
    let mut persister = cluster
        .persister_ready(&brokers, &mongo, &["--no-repair"])
        .await;
    let log_dir = brokers.dir().join("relay-log");
    let copy = brokers.dir().join("relay-log-copy");
    let copy_dir = |from: &std::path::Path, to: &std::path::Path| {
        let status = std::process::Command::new("cp")
            .arg("-a")
            .args([from, to])
            .status()
            .expect("cp");
        assert!(
            status.success(),
            "cp -a {} {}",
            from.display(),
            to.display()
        );
    };
    let mut relay = cluster
        .relay_ready(&brokers, "plant-1", &log_dir, &[])
        .await;
    relay.stop_cleanly().await;
    copy_dir(&log_dir, &copy);
    let db = mongo.database().await;
    for (step, topic) in [
        ("before the restore", "/sensor/before-1/temperature"),
        ("after the restore", "/sensor/after-1/temperature"),
    ] {
        let mut relay = cluster
            .relay_ready(&brokers, "plant-1", &log_dir, &[])
            .await;
        plain_values(brokers.local.port, topic, 100)
            .await
            .expect("the plain values published");
        let (distinct, stored) = wait_for_within(
            CATCH_UP,
            &format!("the plain values taken {step} stored"),
            || values_stored(&db, topic, 100),
            |(distinct, _)| *distinct == 100,
        )
        .await;
        assert_eq!(stored, distinct, "{step}: stored twice");
        relay.stop_cleanly().await;
        std::fs::remove_dir_all(&log_dir).expect("the log removed");
        copy_dir(&copy, &log_dir);
    }
    persister.stop_cleanly().await;
}

/// One message nearly as large as the stream's limit, then small ones: it goes into the
/// stream once that is empty (it is larger than any share of the room), and the rest
/// after it. Before, the relay held it, and everything behind it, for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_nearly_as_large_as_the_stream_goes_through() {
    let args = ["--no-repair", "--nats-max-bytes", "200K"];
    // The cluster kept to the end (a field left out would drop it now).
    let Pipeline {
        brokers,
        mongo,
        cluster: _cluster,
        mut persister,
        mut relay,
        ..
    } = spawn_pipeline(&args).await;
    let mut device = TestClient::connect(brokers.local.port, "temperature-sensor").await;
    let large = format!("{{\"pad\": \"{}\"}}", "x".repeat(190_000));
    device
        .publish(
            "/sensor/large-1/temperature",
            QoS::AtLeastOnce,
            false,
            large.as_bytes(),
        )
        .await;
    plain_values(brokers.local.port, UNKEYED_TOPIC, 20)
        .await
        .expect("the plain values published");
    let db = mongo.database().await;
    wait_for_within(
        CATCH_UP,
        "the large message stored",
        || tests::stored::count(&db, doc! { "topic": "/sensor/large-1/temperature" }),
        |n| *n == 1,
    )
    .await;
    wait_for_within(
        CATCH_UP,
        "the plain values after it stored",
        || unkeyed_stored(&db, 20),
        |(distinct, _)| *distinct == 20,
    )
    .await;
    relay.stop_cleanly().await;
    persister.stop_cleanly().await;
}

/// A hole in a device's stream: readings the stream dropped while no persister read it
/// (its `--nats-max-age` of 3 s passed). The persister's repairer asks the device's site
/// over NATS (`iot.request.plant-1.replay`), the relay answers from its log into the
/// stream, and every reading is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hole_in_the_stream_is_asked_of_the_site_over_nats_and_filled() {
    const SENT: i64 = 4000;
    let (brokers, mongo) = (spawn_relay_brokers().await, spawn_mongo().await);
    let cluster = NatsCluster::spawn(&["plant-1"]).await;
    let short = [
        "--repair-after",
        "2",
        "--nats-max-age",
        "3s",
        "--nats-duplicate-window",
        "3s",
    ];
    let mut persister = cluster.persister_ready(&brokers, &mongo, &short).await;
    let log_dir = brokers.dir().join("relay-log");
    let mut relay = cluster
        .relay_ready(&brokers, "plant-1", &log_dir, &[])
        .await;
    relay
        .wait_for_log("reading replay requests and Sparkplug commands from NATS")
        .await;
    let db = mongo.database().await;

    // 200 a second for 20 s.
    let mut sensor = start_sensor_every(&brokers, "hole-1", &SENT.to_string(), "0.005");
    wait_for(
        "300 readings stored",
        || tests::stored::count(&db, doc! { "device": "hole-1" }),
        |n| *n >= 300,
    )
    .await;
    persister.stop_cleanly().await;
    let js = cluster.admin().await;
    let state = || async {
        let mut stream = js.get_stream(iot_core::nats::STREAM).await.ok()?;
        let info = stream.info().await.ok()?;
        Some((info.state.first_sequence, info.state.last_sequence))
    };
    let (_, last) = wait_for("the stream's state", state, Option::is_some)
        .await
        .expect("a state");
    // 200 readings past the persister's stop dropped unread.
    wait_for("readings dropped by age", state, |state| {
        state.is_some_and(|(first, _)| first > last + 200)
    })
    .await;
    assert!(sensor.is_running(), "the stream ended before the hole");
    let mut persister = cluster.start_persister(&brokers, &mongo, &["--repair-after", "2"]);
    persister
        .wait_for_log("asking the device for missing readings")
        .await;
    sensor.expect_success().await;
    wait_for_within(
        CATCH_UP,
        "every reading stored",
        || tests::stored::count(&db, doc! { "device": "hole-1" }),
        |n| *n >= SENT as u64,
    )
    .await;
    assert_exactly_once(&stored_seqs(&db, "hole-1").await, SENT);
    relay.stop_cleanly().await;
    persister.stop_cleanly().await;
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
    eprintln!("the relay answered {answered} readings from its log");
    assert!(answered >= 200, "{}", relay.stderr());
}

/// Whether a Sparkplug `STATE` says online.
fn online(publish: &rumqttc::Publish) -> bool {
    let state: serde_json::Value = serde_json::from_slice(&publish.payload).expect("STATE is JSON");
    state["online"] == true
}

/// The next `STATE` `watcher` gets that says `want` (online or not).
async fn next_state(watcher: &mut TestClient, want: bool) -> rumqttc::Publish {
    loop {
        let state = watcher.next_message().await;
        if online(&state) == want {
            return state;
        }
    }
}

/// A Sparkplug host must see every message of a node, and persisters share the stream's
/// messages: a host started beside another persister refuses to start and says why,
/// and so does a persister started beside a host; two without Sparkplug share the
/// stream (the replica tests). A persister that stopped leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sparkplug_host_reads_the_stream_alone() {
    let (brokers, mongo) = (spawn_relay_brokers().await, spawn_mongo().await);
    let cluster = NatsCluster::spawn(&["plant-1"]).await;
    let host: &[&str] = &[
        "--no-repair",
        "--ingest",
        "sparkplug",
        "--sparkplug-host-id",
        "scada-1",
    ];
    let replica: &[&str] = &["--no-repair"];

    // Each (first, then, what the second says): the second refuses to start.
    for (first, then, says) in [
        (
            replica,
            host,
            "other persisters read the NATS stream (replica)",
        ),
        (
            host,
            replica,
            "a Sparkplug host reads the NATS stream (sparkplug host scada-1)",
        ),
    ] {
        let mut running = cluster.persister_ready(&brokers, &mongo, first).await;
        running.wait_for_log("other persisters on the stream").await;
        let mut refused = cluster.start_persister(&brokers, &mongo, then);
        let status = refused.wait_exit_within(CLUSTER_WAIT).await;
        assert!(!status.success(), "{then:?} started beside {first:?}");
        let said = refused.stderr();
        assert!(said.contains(says), "{said}");
        assert!(
            running.is_running(),
            "{first:?} stopped:\n{}",
            running.stderr()
        );
        running.stop_cleanly().await;
    }
}

/// The Sparkplug host over NATS (`--ingest sparkplug`): its STATE reaches the edge
/// broker retained through the relay, data it cannot name gets its Rebirth (NCMD to the
/// node's site over NATS, published on the edge by the relay), a birth and data by alias
/// are stored; a clean stop says offline, and a host SIGKILLed is said offline by the
/// relay once its STATE is not heard for `STATE_TIMEOUT` (its will).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sparkplug_host_commands_and_states_reach_the_edge_over_nats() {
    use iot_store::sparkplug::proto::Payload;
    use prost::Message as _;
    use tests::sparkplug::{bd_seq, by_alias, encode, tag};

    const HOST: &str = "nats-host";
    let (brokers, mongo) = (spawn_relay_brokers().await, spawn_mongo().await);
    let db = mongo.database().await;
    let password = brokers.local.add_device("line-7", "sparkplug");
    let cluster = NatsCluster::spawn(&["plant-1"]).await;
    let args = ["--ingest", "sparkplug", "--sparkplug-host-id", HOST];
    let mut persister = cluster.persister_ready(&brokers, &mongo, &args).await;
    let log_dir = brokers.dir().join("relay-log");
    let mut relay = cluster
        .relay_ready(&brokers, "plant-1", &log_dir, &[])
        .await;
    relay
        .wait_for_log("reading replay requests and Sparkplug commands from NATS")
        .await;

    let state_topic = format!("spBv1.0/STATE/{HOST}");
    // Sent again every 10 s: the relay carries the first it hears.
    let mut watcher = TestClient::connect(brokers.local.port, "mqtt-subscriber").await;
    watcher.subscribe(&state_topic).await;
    next_state(&mut watcher, true).await;
    assert!(online(
        &TestClient::retained(brokers.local.port, &state_topic).await
    ));

    let mut node = TestClient::try_connect_as(brokers.local.port, "line-7", &password)
        .await
        .expect("the node's account logs in");
    node.subscribe("spBv1.0/cell/NCMD/line-7").await;
    let topic = |kind: &str| format!("spBv1.0/cell/{kind}/line-7");
    // Data before any birth: the node is asked for its birth, over NATS.
    node.publish(
        &topic("NDATA"),
        QoS::AtMostOnce,
        false,
        &by_alias(5, 1, 1.0),
    )
    .await;
    let command = node.next_message().await;
    let command = Payload::decode(command.payload.as_ref()).expect("a Sparkplug payload");
    assert_eq!(
        command.metrics[0].name.as_deref(),
        Some("Node Control/Rebirth")
    );
    let birth = encode(Some(0), vec![tag(Some("Tag/1".into()), 1, 1.0), bd_seq(1)]);
    node.publish(&topic("NBIRTH"), QoS::AtMostOnce, false, &birth)
        .await;
    node.publish(
        &topic("NDATA"),
        QoS::AtMostOnce,
        false,
        &by_alias(1, 1, 2.5),
    )
    .await;
    let value = doc! { "device": "cell/line-7", "measurement": "Tag/1", "value": 2.5 };
    wait_for(
        "the value by alias",
        || tests::stored::count(&db, value.clone()),
        |n| *n == 1,
    )
    .await;

    // A clean stop says offline.
    persister.stop_cleanly().await;
    next_state(&mut watcher, false).await;
    // A host killed: the relay publishes its will once it is not heard.
    let mut persister = cluster.start_persister(&brokers, &mongo, &args);
    let state = next_state(&mut watcher, true).await;
    persister.kill().await;
    let killed = tokio::time::Instant::now();
    // Asked in turns shorter than the test client's own wait for a message.
    let deadline = killed + iot_core::nats::STATE_TIMEOUT + Duration::from_secs(30);
    let will = loop {
        let turn = tokio::time::timeout(Duration::from_secs(5), next_state(&mut watcher, false));
        if let Ok(will) = turn.await {
            break will;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the killed host's will never reached the edge"
        );
    };
    let retained = TestClient::retained(brokers.local.port, &state_topic).await;
    assert_eq!(retained.payload, will.payload);
    eprintln!(
        "the killed host said offline at the edge after {:?}",
        killed.elapsed()
    );
    let (will, state): (serde_json::Value, serde_json::Value) = (
        serde_json::from_slice(&will.payload).expect("JSON"),
        serde_json::from_slice(&state.payload).expect("JSON"),
    );
    assert_eq!(
        will["timestamp"], state["timestamp"],
        "the will of that run"
    );
    relay.stop_cleanly().await;
}

/// The next server error of a client: a permission violation naming `what`.
async fn violation(errors: &mut tokio::sync::mpsc::UnboundedReceiver<String>, what: &str) {
    let error = tokio::time::timeout(tests::WAIT, errors.recv())
        .await
        .unwrap_or_else(|_| panic!("no permission violation for {what}"))
        .expect("the client's events");
    assert!(
        error.to_lowercase().contains("permissions violation") && error.contains(what),
        "{error}"
    );
}

/// Nothing joins the cluster as a route without the routes' password (scripts/nats-cluster
/// makes one when none is given): a route takes part in every account's traffic. A
/// server that tries with none or a wrong one is refused again and again and never
/// becomes a node's route; with the password it does (so the refusals were the
/// password's). On TLS, a route that does not speak TLS is refused even with the
/// password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_server_joins_the_cluster_without_the_routes_password() {
    let cluster = NatsCluster::spawn(&["plant-1"]).await;
    let password = format!("route:{}", cluster.route_password());
    for (credentials, refused) in [
        (None, "Authorization Violation"),
        (Some("route:wrong"), "Authorization Violation"),
    ] {
        assert_refused_route(&cluster, credentials, refused).await;
    }
    let (_member, id) = cluster.rogue_route(0, Some(&password)).await;
    wait_for_within(
        CLUSTER_WAIT,
        "a server with the routes' password taken as a route",
        || cluster.route_ids_of(0),
        |routes| routes.contains(&id),
    )
    .await;

    let tls = NatsCluster::spawn_tls(&["plant-1"]).await;
    let password = format!("route:{}", tls.route_password());
    // The node closes a plain connection at once.
    assert_refused_route(&tls, Some(&password), "Router connection closed").await;
}

/// The routes' password `scripts/nats-cluster` makes is made once for a folder (compose
/// writes the configuration at every start while nodes may keep running: a new one
/// would split the cluster), and one given that cannot go into a URL, or is shorter
/// than 16 characters, is refused with its name.
#[test]
fn the_routes_password_is_made_once_and_one_given_is_checked() {
    let dir = tempfile::tempdir().expect("a folder");
    let config = |route_password: Option<&str>| {
        let mut script =
            std::process::Command::new(tests::repo_root().join("scripts/nats-cluster"));
        script
            .args(["config", &dir.path().display().to_string()])
            .env("NATS_PERSISTER_PASSWORD", "p")
            .env_remove("NATS_ROUTE_PASSWORD");
        if let Some(password) = route_password {
            script.env("NATS_ROUTE_PASSWORD", password);
        }
        let output = script.output().expect("scripts/nats-cluster runs");
        let node = std::fs::read_to_string(dir.path().join("node-1.conf")).unwrap_or_default();
        (output, node)
    };
    let route_line = |node: &str| {
        node.lines()
            .find(|line| line.contains("routes: ["))
            .unwrap_or_default()
            .to_string()
    };
    let (first, node) = config(None);
    assert!(first.status.success(), "{first:?}");
    let made = std::fs::read_to_string(dir.path().join("route.secret")).expect("made");
    assert!(made.len() >= 32, "{made}");
    assert!(
        route_line(&node).contains(&format!("route:{made}@")),
        "{node}"
    );
    let (_, again) = config(None);
    assert_eq!(route_line(&again), route_line(&node), "made again");

    let (given, node) = config(Some("given-one_2-abcdef"));
    assert!(given.status.success(), "{given:?}");
    assert!(
        route_line(&node).contains("route:given-one_2-abcdef@"),
        "{node}"
    );
    for bad in ["a@b", "a:b", "a/b", "a b", "short-one"] {
        let (refused, _) = config(Some(bad));
        assert_eq!(refused.status.code(), Some(2), "{bad}");
        let said = String::from_utf8_lossy(&refused.stderr);
        assert!(said.contains("NATS_ROUTE_PASSWORD"), "{bad}: {said}");
    }
}

/// The routes' TLS as `scripts/nats-cluster` checks it: a certificate for server
/// authentication only (as `mosquitto/certs.sh` made them before) is refused, since
/// the routes would stay plain text with their password; `mosquitto/certs.sh` makes it
/// again from the same CA (whoever trusts the CA still does), and then it serves. One
/// that does not name a route host is refused too (no cluster would form).
#[test]
fn a_certificate_that_cannot_serve_the_routes_is_refused_and_an_old_one_made_again() {
    let dir = tempfile::tempdir().expect("a folder");
    let certs = dir.path().join("certs");
    let run = |program: &str, args: &[&str], env: &[(&str, &str)]| {
        let output = std::process::Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .env("NATS_PERSISTER_PASSWORD", "p")
            .env("NATS_CERTS_DIR", &certs)
            .current_dir(&certs)
            .output()
            .expect("it runs");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    tests::make_certificates(&certs);
    let ca = std::fs::read(certs.join("ca.crt")).expect("the CA");
    // A server certificate as certs.sh made them before: server authentication only.
    let old = "openssl req -newkey rsa:2048 -nodes -subj /CN=old -keyout server.key -out server.csr 2>/dev/null \
        && printf 'subjectAltName=IP:127.0.0.1\\nextendedKeyUsage=serverAuth\\n' > server.ext \
        && openssl x509 -req -in server.csr -CA ca.crt -CAkey ../certs-ca-private/ca.key -CAcreateserial -days 2 -extfile server.ext -out server.crt 2>/dev/null \
        && rm server.csr server.ext";
    assert_eq!(run("sh", &["-c", old], &[]).0, Some(0));
    let script = tests::repo_root().join("scripts/nats-cluster");
    let script = script.to_str().expect("a path");
    let config = dir.path().join("nats");
    let config = config.to_str().expect("a path");
    let (code, said) = run(script, &["config", config], &[]);
    assert_eq!(code, Some(2), "{said}");
    assert!(said.contains("server authentication only"), "{said}");

    let certs_sh = tests::repo_root().join("mosquitto/certs.sh");
    let (code, said) = run(
        certs_sh.to_str().expect("a path"),
        &[certs.to_str().expect("a path")],
        &[],
    );
    assert_eq!(code, Some(0), "{said}");
    assert!(
        said.contains("made again for client authentication too"),
        "{said}"
    );
    assert_eq!(
        std::fs::read(certs.join("ca.crt")).expect("the CA"),
        ca,
        "a new CA"
    );
    let (code, said) = run(script, &["config", config], &[]);
    assert_eq!(code, Some(0), "{said}");
    let node = std::fs::read_to_string(dir.path().join("nats/node-1.conf")).expect("written");
    assert!(node.contains("ca_file:"), "no TLS on the routes:\n{node}");

    let elsewhere = [("NATS_ROUTE_HOSTS", "127.0.0.2 127.0.0.2 127.0.0.2")];
    let (code, said) = run(script, &["config", config], &elsewhere);
    assert_eq!(code, Some(2), "{said}");
    assert!(
        said.contains("does not name the route host 127.0.0.2"),
        "{said}"
    );
}

/// A server trying to become node 0's route with `credentials` says `refused` twice (it
/// tries again every second), and node 0 has no route with it.
async fn assert_refused_route(cluster: &NatsCluster, credentials: Option<&str>, refused: &str) {
    let (rogue, id) = cluster.rogue_route(0, credentials).await;
    wait_for_within(
        CLUSTER_WAIT,
        &format!("the route with {credentials:?} refused twice"),
        || std::future::ready(rogue.stderr().matches(refused).count()),
        |times| *times >= 2,
    )
    .await;
    let routes = cluster.route_ids_of(0).await;
    assert_eq!(routes.len(), 2, "{routes:?}");
    assert!(!routes.contains(&id), "a route with {credentials:?} taken");
}

/// Two edge sites, each with its own relay and NATS account, into one stream: both
/// sites' readings stored once (keyed and plain values); one site's account may not
/// publish into the other's telemetry subject, nor read its requests, nor send requests
/// or a host's STATE itself (each refused by the cluster as a permission violation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sites_each_with_its_own_account_are_kept_apart() {
    use iot_core::nats::{mqtt_headers, request_subject, site_requests, site_subject};

    const EACH: i64 = 2000;
    let (brokers, mongo) = (spawn_relay_brokers().await, spawn_mongo().await);
    let second_edge = brokers.spawn_relay_site("plant-2").await;
    let cluster = NatsCluster::spawn(&["plant-1", "plant-2"]).await;
    let mut persister = cluster.persister_ready(&brokers, &mongo, &[]).await;
    let mut relays = Vec::new();
    for (site, edge) in [("plant-1", &brokers.local), ("plant-2", &second_edge)] {
        let log_dir = brokers.dir().join(format!("relay-log-{site}"));
        let relay = cluster.start_relay_at(&brokers, edge, site, &log_dir, &[]);
        relay
            .wait_for_log_within(CLUSTER_WAIT, "subscribed on the edge broker")
            .await;
        relay
            .wait_for_log("reading replay requests and Sparkplug commands from NATS")
            .await;
        relays.push(relay);
    }
    let db = mongo.database().await;

    let mut first = start_sensor_every(&brokers, "site-1", &EACH.to_string(), "0.002");
    let args = tests::stored::sensor_args("site-2", &EACH.to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut second = tests::spawn_service(
        "temperature-sensor",
        brokers.dir(),
        second_edge.port,
        Some("temperature-sensor"),
        &args,
    );
    let plain = publish_unkeyed(second_edge.port, UNKEYED);

    // Meanwhile, plant-1's account tries plant-2's subjects.
    let (intruder, mut errors) = cluster.client_as("edge-relay-plant-1").await;
    let mut own = intruder
        .subscribe(site_requests("plant-1"))
        .await
        .expect("its own requests");
    let mut other = intruder
        .subscribe(site_requests("plant-2"))
        .await
        .expect("sent");
    violation(&mut errors, "iot.request.plant-2.>").await;
    for forged in [
        site_subject("plant-2"),
        request_subject("plant-1", "replay"),
        iot_core::nats::STATE_SUBJECT.to_string(),
    ] {
        intruder
            .publish(forged.clone(), "1".into())
            .await
            .expect("sent");
        intruder.flush().await.expect("flushed");
        violation(&mut errors, &forged).await;
    }
    // A request to each site: plant-1's account gets its own only. The cluster delivers
    // one connection's messages in order, so plant-2's, sent first, would have come
    // first.
    let (persister_client, _) = cluster.client_as("mongo-persister").await;
    for site in ["plant-2", "plant-1"] {
        persister_client
            .publish_with_headers(
                request_subject(site, "replay"),
                mqtt_headers("/replay/nobody/request", 1, false),
                format!("{site} only").into(),
            )
            .await
            .expect("sent");
    }
    persister_client.flush().await.expect("flushed");
    let heard = tokio::time::timeout(tests::WAIT, futures_util::StreamExt::next(&mut own))
        .await
        .expect("its own request")
        .expect("a message");
    assert_eq!(heard.payload.as_ref(), b"plant-1 only");
    let leaked = futures_util::FutureExt::now_or_never(futures_util::StreamExt::next(&mut other));
    assert!(
        leaked.flatten().is_none(),
        "plant-1's account read plant-2's request"
    );

    first.expect_success().await;
    second.expect_success().await;
    plain.await.expect("the plain values published");
    for device in ["site-1", "site-2"] {
        wait_for_within(
            CATCH_UP,
            &format!("every reading of {device} stored"),
            || tests::stored::count(&db, doc! { "device": device }),
            |n| *n >= EACH as u64,
        )
        .await;
        assert_exactly_once(&stored_seqs(&db, device).await, EACH);
    }
    let (distinct, stored) = wait_for_within(
        CATCH_UP,
        "every plain value stored",
        || unkeyed_stored(&db, UNKEYED),
        |(distinct, _)| *distinct == UNKEYED as usize,
    )
    .await;
    assert_eq!(stored, distinct, "plain values stored twice");
    for relay in &mut relays {
        relay.stop_cleanly().await;
    }
    persister.stop_cleanly().await;
}

/// The node leading the stream cut off from the other two (every route to or from it
/// closed and refused, through the test's proxies; its clients stay connected to it)
/// while the stream flows, then healed: the other two elect a leader and go on, and
/// every reading, keyed or not, is stored once.
///
/// Once, in a clean-clone CI run beside the Docker tier, 12 of the 3 000 plain values
/// were stored twice (every keyed reading once) when plain values were keyed by their
/// stream sequence: the stream held them at two sequences, or the replicas numbered
/// them apart. Not seen again in 12 runs under load, and not explained; plain values are
/// now keyed by the relay's message id, which such a copy keeps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_the_others_and_healed_loses_nothing_and_stores_nothing_twice() {
    // About 30 s of readings: the cut, the election and more readings fall within it.
    const SENT: i64 = 15_000;
    let (brokers, mongo) = (spawn_relay_brokers().await, spawn_mongo().await);
    let cluster = NatsCluster::spawn_partitionable(&["plant-1"]).await;
    let mut persister = cluster
        .persister_ready(&brokers, &mongo, &["--no-repair"])
        .await;
    let log_dir = brokers.dir().join("relay-log");
    let metrics = tests::free_port();
    let address = format!("127.0.0.1:{metrics}");
    let mut relay = cluster
        .relay_ready(
            &brokers,
            "plant-1",
            &log_dir,
            &["--metrics-address", &address],
        )
        .await;
    let db = mongo.database().await;
    let stored = || tests::stored::count(&db, doc! { "device": "cut-1" });

    let mut sensor = start_sensor_every(&brokers, "cut-1", &SENT.to_string(), "0.002");
    let plain = publish_unkeyed(brokers.local.port, UNKEYED);
    wait_for("1000 readings stored", stored, |n| *n >= 1000).await;
    let js = cluster.admin().await;
    let leader = wait_for(
        "the stream's leader",
        || cluster.stream_leader(&js),
        Option::is_some,
    )
    .await
    .expect("a leader");
    cluster.isolate(leader);
    let cut = tokio::time::Instant::now();
    wait_for(
        "the cut node without routes",
        || cluster.routes_of(leader),
        |routes| *routes == Some(0),
    )
    .await;
    let majority = cluster.admin_at((leader + 1) % 3).await;
    let new_leader = wait_for_within(
        CATCH_UP,
        "a leader among the other two",
        || cluster.stream_leader(&majority),
        |new| new.is_some_and(|new| new != leader),
    )
    .await;
    let elected = cut.elapsed();
    let at_election = stored().await;
    // The stream flows on at the edge while the node is cut off: 1 000 more readings
    // taken by the relay.
    let logged = || async {
        metric(metrics, "iot_relay_logged_total")
            .await
            .unwrap_or_default()
    };
    let logged_at_election = logged().await;
    wait_for_within(
        CATCH_UP,
        "1 000 more readings taken by the relay while the node is cut off",
        logged,
        |n| *n >= logged_at_election + 1000.0,
    )
    .await;
    let stored_while_cut = stored().await - at_election;
    eprintln!(
        "cut off node-{} (the stream's leader) at {at_election} readings stored: node-{} led after {elected:?}; {stored_while_cut} more stored while cut off; healed after {:?}",
        leader + 1,
        new_leader.map_or(0, |new| new + 1),
        cut.elapsed()
    );
    cluster.heal();
    wait_for_within(
        CATCH_UP,
        "the node back in the cluster",
        || cluster.routes_of(leader),
        |routes| *routes == Some(2),
    )
    .await;
    sensor.expect_success().await;
    plain.await.expect("the plain values published");

    assert_all_stored_once(&db, "cut-1", SENT, UNKEYED).await;
    let after = wait_for(
        "the stream's leader after the heal",
        || cluster.stream_leader(&js),
        Option::is_some,
    )
    .await;
    assert_ne!(after, Some(leader), "the leader did not move");
    relay.stop_cleanly().await;
    persister.stop_cleanly().await;
    for line in relay.stderr().lines().chain(persister.stderr().lines()) {
        if line.contains("NATS") && !line.contains("INFO") {
            eprintln!("{line}");
        }
    }
}

/// How long [`the_whole_cloud_tier_down_for_a_long_outage_loses_nothing`] keeps the
/// cloud down: `IOT_NATS_OUTAGE` (90, 30s, 10m), 10 minutes by default.
fn outage() -> Duration {
    let value = std::env::var("IOT_NATS_OUTAGE").unwrap_or_else(|_| "10m".into());
    iot_core::config::parse_duration(&value)
        .unwrap_or_else(|why| panic!("IOT_NATS_OUTAGE={value}: {why}"))
}

/// The whole cloud tier down (the three nodes and the persister SIGKILLed) for
/// `IOT_NATS_OUTAGE` while a sensor goes on at 50 readings a second and plain values at
/// 10: the relay's log holds what it takes meanwhile (its oldest unforwarded reading
/// grows as old as the outage), and drains once the cloud is back; every reading stored
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "as long as IOT_NATS_OUTAGE (10 minutes by default): scripts/test runs it beside the other tests; IOT_NATS_OUTAGE=2m for a shorter one"]
async fn the_whole_cloud_tier_down_for_a_long_outage_loses_nothing() {
    let outage = outage();
    let (brokers, mongo) = (spawn_relay_brokers().await, spawn_mongo().await);
    let mut cluster = NatsCluster::spawn(&["plant-1"]).await;
    let mut persister = cluster
        .persister_ready(&brokers, &mongo, &["--no-repair"])
        .await;
    let log_dir = brokers.dir().join("relay-log");
    let metrics = tests::free_port();
    let address = format!("127.0.0.1:{metrics}");
    let mut relay = cluster
        .relay_ready(
            &brokers,
            "plant-1",
            &log_dir,
            &["--metrics-address", &address],
        )
        .await;
    let db = mongo.database().await;
    let stored = || tests::stored::count(&db, doc! { "device": "out-1" });
    let relay_metric = |name: &'static str| metric(metrics, name);

    let mut sensor = brokers.start_edge(
        "temperature-sensor",
        &[
            "--format",
            "json",
            "--qos",
            "1",
            "--no-retain",
            "--rate",
            "50",
            "--device",
            "out-1",
        ],
    );
    // Until well after the cloud is back.
    let plain_count = u32::try_from((outage.as_secs() + 30) * 10).expect("a count");
    let plain = publish_unkeyed_every(brokers.local.port, plain_count, Duration::from_millis(100));
    wait_for("200 readings stored", stored, |n| *n >= 200).await;
    for node in 0..3 {
        cluster.kill(node).await;
    }
    persister.kill().await;
    let down = tokio::time::Instant::now();
    let held = wait_for_within(
        outage + Duration::from_secs(60),
        "the relay's oldest unforwarded reading as old as the outage",
        || relay_metric("iot_relay_oldest_unforwarded_seconds"),
        |age| age.is_some_and(|age| age >= outage.as_secs_f64()),
    )
    .await;
    let backlog = relay_metric("iot_relay_backlog").await.unwrap_or_default();
    assert!(sensor.is_running(), "the sensor stopped during the outage");
    eprintln!(
        "cloud down {:?}: the relay holds {backlog} messages, the oldest {held:?} s old",
        down.elapsed()
    );

    cluster.start_all().await;
    let mut persister = cluster.start_persister(&brokers, &mongo, &["--no-repair"]);
    let back = tokio::time::Instant::now();
    wait_for_within(
        CATCH_UP + outage,
        "the relay's backlog drained",
        || relay_metric("iot_relay_backlog"),
        |backlog| *backlog == Some(0.0),
    )
    .await;
    let drained = back.elapsed();
    sensor.stop_cleanly().await;
    let log = sensor.stderr();
    let sent: i64 = log
        .lines()
        .find_map(|line| {
            line.split("summary: ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no summary:\n{log}"));
    plain.await.expect("the plain values published");
    wait_for_within(
        CATCH_UP + outage,
        "every keyed reading stored",
        stored,
        |n| *n >= sent as u64,
    )
    .await;
    let stored_in = back.elapsed();
    let (distinct, twice) = wait_for_within(
        CATCH_UP,
        "every plain value stored",
        || unkeyed_stored(&db, plain_count),
        |(distinct, _)| *distinct == plain_count as usize,
    )
    .await;
    eprintln!(
        "after {outage:?} down: the relay's {backlog} messages forwarded {drained:?} after the cloud was back, {sent} readings stored {stored_in:?} after"
    );
    assert_exactly_once(&stored_seqs(&db, "out-1").await, sent);
    assert_eq!(twice, distinct, "plain values stored twice");
    relay.stop_cleanly().await;
    persister.stop_cleanly().await;
}

/// The clients' side of the cluster on TLS (`NATS_CERTS_DIR`, a certificate from
/// `mosquitto/certs.sh`): a client that does not know the CA gets nowhere; the relay and
/// the persister, given it (`CLOUD_TLS_CA`), carry every reading, stored once; a relay
/// given a CA file that is not there stops with one line, exit 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cloud_tier_on_tls_carries_the_stream_and_refuses_who_cannot_verify_it() {
    const SENT: i64 = 1000;
    let (brokers, mongo) = (spawn_relay_brokers().await, spawn_mongo().await);
    let cluster = NatsCluster::spawn_tls(&["plant-1"]).await;
    assert!(cluster.tls_ca().is_some());
    let first = format!("nats://127.0.0.1:{}", cluster.ports[0]);
    let unverified = async_nats::ConnectOptions::new()
        .user_and_password("mongo-persister".into(), tests::password("mongo-persister"))
        .connect(first.as_str())
        .await;
    assert!(unverified.is_err(), "a client without the CA got in");
    let plain = async_nats::ConnectOptions::new()
        .user_and_password("mongo-persister".into(), tests::password("mongo-persister"))
        .require_tls(false)
        .connect(first.as_str())
        .await;
    assert!(plain.is_err(), "a client without TLS got in");

    let mut persister = cluster.persister_ready(&brokers, &mongo, &[]).await;
    let log_dir = brokers.dir().join("relay-log");
    let mut relay = cluster
        .relay_ready(&brokers, "plant-1", &log_dir, &[])
        .await;
    let db = mongo.database().await;
    let mut sensor = start_sensor_every(&brokers, "tls-1", &SENT.to_string(), "0.002");
    sensor.expect_success().await;
    wait_for_within(
        CATCH_UP,
        "every reading stored",
        || tests::stored::count(&db, doc! { "device": "tls-1" }),
        |n| *n >= SENT as u64,
    )
    .await;
    assert_exactly_once(&stored_seqs(&db, "tls-1").await, SENT);
    assert!(relay.stderr().contains("(TLS)"), "{}", relay.stderr());
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
