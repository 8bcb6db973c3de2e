//! Persister replicas as users deploy them: a shared subscription over named replicas,
//! a replica restarted or retired, status changes split between replicas. Real brokers
//! from `mosquitto/`, the real `mongo-persister`, a real MongoDB-wire-protocol server.

use bson::doc;
use mongodb::Database;
use rumqttc::QoS;
use tests::stored::{
    assert_exactly_once, start_sensor, status_history, stored_seqs, wait_for_readings,
};
use tests::{spawn_brokers, spawn_mongo, wait_for, Brokers, MongoServer, Service, TestClient};

const SHARE: [&str; 2] = ["--share", "persisters"];

/// Starts a replica of the group `persisters` named `id` and waits until it subscribed.
async fn replica(brokers: &Brokers, mongo: &MongoServer, id: &str) -> Service {
    let mut args = SHARE.to_vec();
    // Throughput lines often, for the tests that read them.
    args.extend(["--client-id", id, "--stats-interval", "0.1"]);
    brokers.persister_ready(mongo, &args).await
}

/// The replicas `persister-a` and `persister-b` of the group, both subscribed.
async fn two_replicas(brokers: &Brokers, mongo: &MongoServer) -> (Service, Service) {
    let a = replica(brokers, mongo, "persister-a").await;
    let b = replica(brokers, mongo, "persister-b").await;
    (a, b)
}

/// Publishes `count` JSON readings of `device` at QoS 1 from the real sensor, and
/// waits until the edge broker has them all.
async fn publish(brokers: &Brokers, device: &str, count: &str) {
    start_sensor(brokers, device, count).expect_success().await;
}

/// Waits until `device` has `count` readings stored, then asserts they are seq 1 to
/// `count`, each once.
async fn assert_stored_once(db: &Database, device: &str, count: u64) {
    wait_for_readings(db, doc! { "device": device }, count).await;
    assert_exactly_once(&stored_seqs(db, device).await, count as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_replica_without_a_client_id_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut command = tokio::process::Command::new(tests::binary("mongo-persister"));
    command
        .args(SHARE)
        .env_clear()
        .current_dir(dir.path())
        .kill_on_drop(true);
    // Accepted, it would wait for its broker forever.
    let output = tokio::time::timeout(tests::WAIT, command.output())
        .await
        .expect("refused at once, not started")
        .expect("runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("--client-id") && stderr.contains("PERSISTER_CLIENT_ID"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_replica_loses_nothing_and_leaves_no_session() {
    let (brokers, mongo) = (spawn_brokers().await, spawn_mongo().await);
    let db = mongo.database().await;
    let (mut a, mut b) = two_replicas(&brokers, &mongo).await;

    publish(&brokers, "before", "100").await;
    assert_stored_once(&db, "before", 100).await;

    // A is removed: its session stays in the group and takes half of what follows.
    a.stop_cleanly().await;
    publish(&brokers, "while-away", "100").await;
    let retire = [
        "--retire",
        "--client-id",
        "persister-a",
        "--share",
        "persisters",
    ];
    let mut retiring = brokers.start_persister(&mongo, &retire);
    retiring.expect_success().await;
    let summary = retiring.stdout_lines();
    assert_eq!(summary.len(), 1, "{summary:?}");
    assert!(
        summary[0].starts_with("retired persister-a: stored "),
        "{summary:?}"
    );

    publish(&brokers, "after", "100").await;
    assert_stored_once(&db, "while-away", 100).await;
    assert_stored_once(&db, "after", 100).await;

    // The broker forgot the session: a connection under its name finds none.
    let probe = TestClient::try_connect(
        brokers.cloud.port,
        Some("mongo-persister"),
        "persister-a",
        false,
    )
    .await
    .expect("connects");
    assert!(
        !probe.session_present,
        "persister-a's session is still kept"
    );
    b.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_restarted_under_its_id_stores_what_came_while_it_was_down() {
    let (brokers, mongo) = (spawn_brokers().await, spawn_mongo().await);
    let db = mongo.database().await;
    let (mut a, mut b) = two_replicas(&brokers, &mongo).await;

    a.kill().await;
    publish(&brokers, "down", "300").await;
    let mut a = brokers.start_persister(
        &mongo,
        &["--share", "persisters", "--client-id", "persister-a"],
    );
    assert_stored_once(&db, "down", 300).await;
    a.stop_cleanly().await;
    b.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_changes_split_between_replicas_are_stored_exactly() {
    let (brokers, mongo) = (spawn_brokers().await, spawn_mongo().await);
    let db = mongo.database().await;
    let (mut a, mut b) = two_replicas(&brokers, &mongo).await;

    // The broker hands the group's messages out in turn, so consecutive changes of the
    // device go to different replicas.
    let topic = "/device/split-1/status";
    let mut device = TestClient::connect(brokers.local.port, "device-status").await;
    let expected = ["online", "offline", "online", "offline"];
    for (stored, status) in expected.iter().enumerate() {
        device
            .publish(topic, QoS::AtLeastOnce, false, status.as_bytes())
            .await;
        wait_for(
            &format!("{} status changes", stored + 1),
            || status_history(&db, "split-1"),
            |history| history.len() > stored,
        )
        .await;
    }
    // A repeat is not a change, whichever replica gets it.
    device
        .publish(topic, QoS::AtLeastOnce, false, b"offline")
        .await;
    let skipped = |replica: &Service| replica.stderr().contains("skipped=1 ");
    wait_for(
        "a replica to skip the repeated status",
        || std::future::ready(skipped(&a) || skipped(&b)),
        |seen| *seen,
    )
    .await;
    a.stop_cleanly().await;
    b.stop_cleanly().await;
    assert_eq!(status_history(&db, "split-1").await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persister_that_becomes_a_replica_takes_each_message_once() {
    // compose's single persister, then the same session as the first of two replicas
    // (compose.replicas.yaml): its plain subscriptions from before must not stay, or it
    // would take every message a second time.
    let (brokers, mongo) = (spawn_brokers().await, spawn_mongo().await);
    let db = mongo.database().await;
    let mut single = brokers
        .persister_ready(&mongo, &["--client-id", "persister-a"])
        .await;
    single.stop_cleanly().await;
    let (mut a, mut b) = two_replicas(&brokers, &mongo).await;

    publish(&brokers, "switched", "200").await;
    assert_stored_once(&db, "switched", 200).await;
    a.stop_cleanly().await;
    b.stop_cleanly().await;
    for replica in [&a, &b] {
        let last = replica
            .stderr()
            .lines()
            .rev()
            .find(|line| line.contains("in="))
            .map(str::to_string)
            .unwrap_or_default();
        assert!(last.contains(" duplicates=0 "), "{}: {last}", replica.name);
    }
}
