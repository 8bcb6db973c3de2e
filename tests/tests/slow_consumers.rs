//! Consumers slower than their stream, against real brokers from `mosquitto/`: the
//! connection must stay alive (keep-alive pings go on) and, at QoS 1, nothing may be
//! lost while the consumer catches up.
//!
//! Mosquitto checks keep-alives only while it has other work, so each stall happens
//! while readings keep flowing, as it would in use.

use std::time::Duration;

use iot_core::config::BrokerSettings;
use iot_core::mqtt::{Connection, Event};
use rumqttc::{QoS, SubscribeFilter};
use tests::{password, service_command, spawn_brokers, spawn_service, Service, WAIT};
use tokio::io::{AsyncBufReadExt, BufReader};

/// What the broker logs when a client stayed silent past 1.5 × its keep-alive.
const TIMED_OUT: &str = "has exceeded timeout";

async fn next_event(connection: &mut Connection) -> Event {
    tokio::time::timeout(WAIT, connection.recv())
        .await
        .expect("an event in time")
        .expect("the connection runs")
}

/// A consumer on the cloud broker subscribes, reads none of its events while 3 000
/// messages arrive over 6 s (six times its keep-alive), then reads them all.
async fn stall(qos: QoS) {
    const MESSAGES: usize = 3000;
    let brokers = spawn_brokers().await;
    let client_id = format!("stalling-consumer-{}", qos as u8);
    let broker = BrokerSettings {
        host: "127.0.0.1".into(),
        port: brokers.cloud.port,
        username: Some("mongo-persister".into()),
        password: Some(password("mongo-persister")),
        tls_ca: None,
        keep_alive: Duration::from_secs(1),
        env_prefix: "CLOUD",
    };
    let mut options = broker.mqtt_options(&client_id, false).expect("options");
    options.set_manual_acks(true);
    let mut connection = Connection::start(&broker, options);
    assert!(matches!(
        next_event(&mut connection).await,
        Event::Connected { .. }
    ));
    connection
        .subscribe(vec![SubscribeFilter::new("/sensor/stall".into(), qos)])
        .await
        .expect("subscribe");
    assert!(matches!(
        next_event(&mut connection).await,
        Event::Subscribed(_)
    ));

    let qos_flag = (qos as u8).to_string();
    let args = [
        "--topic",
        "/sensor/stall",
        "--count",
        "3000",
        "--interval",
        "0.002",
        "--qos",
        &qos_flag,
        "--no-retain",
    ];
    let mut sensor = spawn_service(
        "pressure-sensor",
        brokers.dir(),
        brokers.cloud.port,
        Some("bridge"),
        &args,
    );
    // Meanwhile the consumer reads nothing.
    sensor.expect_success().await;

    let mut received = 0;
    let drained = tokio::time::timeout(WAIT, async {
        while received < MESSAGES {
            match connection.recv().await.expect("the connection runs") {
                Event::Message { ack, .. } => {
                    received += 1;
                    connection.ack(ack).await.expect("ack");
                }
                Event::Connected { .. } => panic!("the connection was lost and made again"),
                _ => {}
            }
        }
    })
    .await;
    let log = brokers.cloud.log();
    assert!(
        !log.contains(&format!("{client_id} {TIMED_OUT}")),
        "the broker dropped the stalled consumer:\n{log}"
    );
    if qos == QoS::AtLeastOnce {
        assert!(
            drained.is_ok(),
            "{received} of {MESSAGES} QoS 1 messages arrived"
        );
    } else {
        assert!(received > 0, "no QoS 0 message arrived");
    }
    connection
        .close(Duration::from_secs(5))
        .await
        .expect("closes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_stalled_past_its_keep_alive_keeps_its_qos0_connection() {
    stall(QoS::AtMostOnce).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_stalled_past_its_keep_alive_loses_no_qos1_message() {
    stall(QoS::AtLeastOnce).await;
}

/// `mqtt-subscriber --format json | (sleep; cat)`: stdout blocks for over twice the
/// keep-alive while readings flow; the broker never drops the subscriber, and every
/// QoS 1 message is printed once the pipe drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_behind_a_stalled_pipe_stays_connected_and_prints_everything() {
    const MESSAGES: usize = 3500;
    let brokers = spawn_brokers().await;
    let command = service_command(
        "mqtt-subscriber",
        brokers.dir(),
        brokers.local.port,
        Some("mqtt-subscriber"),
        &["--format", "json", "--topic", "/sensor/pressure"],
        &[("LOCAL_KEEP_ALIVE", "5".to_string())],
    );
    let (mut subscriber, stdout) = Service::spawn_holding_stdout("mqtt-subscriber", command);
    subscriber.wait_for_log("subscribed").await;

    // 14 s of readings; nobody reads the pipe meanwhile. It is full after a second or
    // so, leaving over twice the 5 s keep-alive.
    let args = [
        "--count",
        "3500",
        "--interval",
        "0.004",
        "--qos",
        "1",
        "--no-retain",
        "--format",
        "json",
    ];
    brokers
        .start_edge("pressure-sensor", &args)
        .expect_success()
        .await;

    let mut lines = BufReader::new(stdout).lines();
    let mut seqs = Vec::new();
    while seqs.len() < MESSAGES {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("only {} lines printed", seqs.len()))
            .expect("read")
            .expect("a line");
        let message: serde_json::Value = serde_json::from_str(&line).expect("json line");
        let payload = message["payload"].as_str().expect("text payload");
        let reading: serde_json::Value = serde_json::from_str(payload).expect("json reading");
        seqs.push(reading["seq"].as_u64().expect("seq"));
    }
    assert!(
        seqs.iter().copied().eq(1..=MESSAGES as u64),
        "not every seq once, in order"
    );
    let log = brokers.local.log();
    assert!(
        !log.contains(&format!("mqtt_subscriber_1 {TIMED_OUT}")),
        "the broker dropped the subscriber:\n{log}"
    );
    assert!(
        !subscriber.stderr().contains("connection lost"),
        "{}",
        subscriber.stderr()
    );
    subscriber.stop_cleanly().await;
}
