//! The driver against a broker that speaks just enough MQTT over a socket to script
//! what a real Mosquitto does only by chance: losing a publish before confirming it,
//! reusing a packet id on a new connection, answering a CONNECT late.
//!
//! Each test also pins a behaviour of rumqttc that the driver relies on (see the
//! module header of `mqtt.rs`), so that an upgrade that changes one fails here.

use super::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(20);

/// Reads one MQTT packet: its type (high nibble of the first byte) and its body.
async fn read_packet(stream: &mut TcpStream) -> (u8, Vec<u8>) {
    let first = stream.read_u8().await.expect("a packet");
    let (mut length, mut shift) = (0usize, 0);
    loop {
        let byte = stream.read_u8().await.expect("its length");
        length |= usize::from(byte & 0x7f) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body).await.expect("its body");
    (first >> 4, body)
}

/// Accepts a connection and answers CONNECT, with or without a session.
async fn accept(listener: &TcpListener, session_present: bool) -> TcpStream {
    let mut stream = accept_connect(listener).await;
    connack(&mut stream, session_present).await;
    stream
}

/// Accepts a connection and reads its CONNECT, without answering yet.
async fn accept_connect(listener: &TcpListener) -> TcpStream {
    let (mut stream, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .expect("a connection in time")
        .expect("a connection");
    assert_eq!(read_packet(&mut stream).await.0, 1, "CONNECT first");
    stream
}

async fn connack(stream: &mut TcpStream, session_present: bool) {
    stream
        .write_all(&[0x20, 0x02, u8::from(session_present), 0x00])
        .await
        .expect("CONNACK");
}

/// A QoS 1 PUBLISH packet.
fn publish_packet(topic: &str, pkid: u16, payload: &[u8]) -> Vec<u8> {
    let length = 2 + topic.len() + 2 + payload.len();
    assert!(length < 128, "one length byte");
    let mut packet = vec![0x32, length as u8];
    packet.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    packet.extend_from_slice(topic.as_bytes());
    packet.extend_from_slice(&pkid.to_be_bytes());
    packet.extend_from_slice(payload);
    packet
}

fn settings(listener: &TcpListener) -> BrokerSettings {
    BrokerSettings {
        host: "127.0.0.1".into(),
        port: listener.local_addr().expect("address").port(),
        username: None,
        password: None,
        tls_ca: None,
        keep_alive: Duration::from_secs(30),
        env_prefix: "CLOUD",
    }
}

/// A connection with manual acknowledgements and a persistent session.
fn consumer(listener: &TcpListener) -> Connection {
    let broker = settings(listener);
    let mut options = broker.mqtt_options("ack-test", false).expect("options");
    options.set_manual_acks(true);
    Connection::start(&broker, options)
}

async fn next_event(connection: &mut Connection) -> Event {
    tokio::time::timeout(WAIT, connection.recv())
        .await
        .expect("an event in time")
        .expect("the connection runs")
}

/// The next message's payload and acknowledgement.
async fn next_message(connection: &mut Connection) -> (String, Ack) {
    loop {
        if let Event::Message { publish, ack } = next_event(connection).await {
            return (String::from_utf8_lossy(&publish.payload).into_owned(), ack);
        }
    }
}

async fn wait_connected(connection: &mut Connection) -> bool {
    loop {
        if let Event::Connected {
            session_present, ..
        } = next_event(connection).await
        {
            return session_present;
        }
    }
}

#[tokio::test]
async fn a_packet_mqtt_cannot_encode_is_an_error_of_that_publish_alone() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let broker = settings(&listener);
    let options = broker.mqtt_options("too-long-test", true).expect("options");
    let mut connection = Connection::start(&broker, options);
    let mut stream = accept(&listener, false).await;
    assert!(!wait_connected(&mut connection).await);

    // A topic of 65 540 bytes (its length would be cut to 16 bits on the wire), and a
    // packet past the brokers' maximum: refused, nothing written.
    let long = format!("/replay/{}/request", "d".repeat(65_530));
    for (topic, payload) in [
        (long.as_str(), b"{}".to_vec()),
        ("/t", vec![b'x'; MAX_OUTGOING_PACKET]),
    ] {
        let error = connection
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .expect_err("refused");
        assert!(error.downcast_ref::<Unencodable>().is_some(), "{error:#}");
    }
    // The connection goes on: the next publish is the first packet the broker reads.
    connection
        .publish("/sensor/t", QoS::AtMostOnce, false, b"21.50".to_vec())
        .await
        .expect("queued");
    let (kind, body) = read_packet(&mut stream).await;
    assert_eq!(kind, 3, "PUBLISH");
    assert!(body.ends_with(b"21.50"));
    assert!(encodable(&"t".repeat(MAX_TOPIC_BYTES), QoS::AtMostOnce, 0).is_ok());
    // At the edge as Mosquitto counts it: remaining length + 1 within 2 MiB.
    let largest = MAX_OUTGOING_PACKET - 1 - 2 - "/t".len() - 2;
    assert_eq!(
        remaining_length("/t", QoS::AtLeastOnce, largest),
        MAX_OUTGOING_PACKET - 1
    );
    assert!(encodable("/t", QoS::AtLeastOnce, largest).is_ok());
    assert!(encodable("/t", QoS::AtLeastOnce, largest + 1).is_err());
    assert!(encodable("/a/+/b", QoS::AtMostOnce, 0).is_err());
}

#[tokio::test]
async fn a_publish_never_confirmed_is_sent_again_to_a_broker_that_forgot_the_session() {
    // rumqttc keeps unconfirmed publishes in `EventLoop::pending` after a drop, and
    // clears them when the broker answers without a session: the driver keeps them.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let broker = settings(&listener);
    let options = broker.mqtt_options("resend-test", true).expect("options");
    let mut connection = Connection::start(&broker, options);
    connection
        .publish("/sensor/t", QoS::AtLeastOnce, false, b"21.50".to_vec())
        .await
        .expect("queued");

    // The broker reads the publish and dies before confirming it.
    let mut stream = accept(&listener, false).await;
    let (kind, body) = read_packet(&mut stream).await;
    assert_eq!(kind, 3, "PUBLISH");
    assert!(body.ends_with(b"21.50"));
    drop(stream);

    // Back without our session: the reading comes again, and once confirmed the
    // connection counts it acknowledged.
    let events = tokio::spawn(async move {
        connection
            .wait_acknowledged(WAIT)
            .await
            .map(|all| (all, connection.acknowledged()))
    });
    let mut stream = accept(&listener, false).await;
    let (kind, body) = read_packet(&mut stream).await;
    assert_eq!(kind, 3, "the same PUBLISH again");
    assert!(body.ends_with(b"21.50"));
    let packet_id = &body[2 + "/sensor/t".len()..][..2];
    stream
        .write_all(&[0x40, 0x02, packet_id[0], packet_id[1]])
        .await
        .expect("PUBACK");
    let (all, acknowledged) = events.await.expect("task").expect("connection");
    assert!(all && acknowledged == 1);
}

/// Reads one PUBLISH: its packet id and payload.
async fn read_publish(stream: &mut TcpStream, topic: &str) -> (u16, Vec<u8>) {
    let (kind, body) = read_packet(stream).await;
    assert_eq!(kind, 3, "PUBLISH");
    let rest = &body[2 + topic.len()..];
    (u16::from_be_bytes([rest[0], rest[1]]), rest[2..].to_vec())
}

async fn puback(stream: &mut TcpStream, pkid: u16) {
    let [high, low] = pkid.to_be_bytes();
    stream
        .write_all(&[0x40, 0x02, high, low])
        .await
        .expect("PUBACK");
}

#[tokio::test]
async fn publishes_go_out_in_order_as_far_as_the_in_flight_window_has_room() {
    // The driver writes QoS 1 publishes itself: rumqttc's state still numbers them and
    // holds the fourth of a window of three until the first is acknowledged.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let broker = settings(&listener);
    let mut options = broker.mqtt_options("window-test", true).expect("options");
    options.set_inflight(3);
    let mut connection = Connection::start(&broker, options);
    for n in 0..5 {
        let payload = n.to_string().into_bytes();
        connection
            .publish("/sensor/t", QoS::AtLeastOnce, false, payload)
            .await
            .expect("queued");
    }
    let mut stream = accept(&listener, false).await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(read_publish(&mut stream, "/sensor/t").await);
    }
    let first: Vec<(u16, &[u8])> = seen.iter().map(|(id, p)| (*id, p.as_slice())).collect();
    assert_eq!(first, [(1, &b"0"[..]), (2, b"1"), (3, b"2")]);
    // Each acknowledgement makes room for one more, under the packet id it freed.
    puback(&mut stream, 1).await;
    assert_eq!(
        read_publish(&mut stream, "/sensor/t").await,
        (1, b"3".to_vec())
    );
    puback(&mut stream, 2).await;
    assert_eq!(
        read_publish(&mut stream, "/sensor/t").await,
        (2, b"4".to_vec())
    );
    for pkid in [3, 1, 2] {
        puback(&mut stream, pkid).await;
    }
    assert!(connection
        .wait_acknowledged(WAIT)
        .await
        .expect("connection"));
    assert_eq!(connection.acknowledged(), 5);
}

#[tokio::test]
async fn unconfirmed_publishes_are_forgotten_on_a_lost_session_when_the_service_says_so() {
    // edge-relay's refill sends them again itself; the connection does not, and says
    // how many it did not.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let broker = settings(&listener);
    let options = broker.mqtt_options("forget-test", false).expect("options");
    let mut connection = Connection::start_checked(&broker, options, None, Unconfirmed::Forget);
    connection
        .publish("/sensor/t", QoS::AtLeastOnce, false, b"first".to_vec())
        .await
        .expect("queued");
    let stream = {
        let mut stream = accept(&listener, false).await;
        assert_eq!(read_publish(&mut stream, "/sensor/t").await.1, b"first");
        stream
    };
    assert!(matches!(
        next_event(&mut connection).await,
        Event::Connected { forgotten: 0, .. }
    ));
    drop(stream);
    // Published while the connection drops: written to the dead socket or still queued,
    // it is forgotten too.
    connection
        .publish("/sensor/t", QoS::AtLeastOnce, false, b"meanwhile".to_vec())
        .await
        .expect("queued");

    let mut stream = accept(&listener, false).await;
    assert!(matches!(
        next_event(&mut connection).await,
        Event::Connected {
            session_present: false,
            forgotten: 2
        }
    ));
    assert!(connection
        .wait_acknowledged(WAIT)
        .await
        .expect("connection"));
    connection
        .publish("/sensor/t", QoS::AtLeastOnce, false, b"second".to_vec())
        .await
        .expect("queued");
    let (_, payload) = read_publish(&mut stream, "/sensor/t").await;
    assert_eq!(payload, b"second", "the first not sent again");
}

#[tokio::test]
async fn an_acknowledgement_is_written_only_on_the_connection_its_message_came_on() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let mut connection = consumer(&listener);

    // Connection 1 delivers two messages in one write and drops at once. rumqttc reads
    // both and the end of the stream in one batch and reports the drop; the messages
    // stay in its state's events, and the driver hands them over as connection 1's.
    let mut first = accept(&listener, false).await;
    let mut both = publish_packet("/sensor/t", 1, b"A");
    both.extend(publish_packet("/sensor/t", 2, b"B"));
    first.write_all(&both).await.expect("two PUBLISHes");
    drop(first);
    assert!(!wait_connected(&mut connection).await);
    let (a, ack_a) = next_message(&mut connection).await;
    let (b, ack_b) = next_message(&mut connection).await;
    assert_eq!((a.as_str(), b.as_str()), ("A", "B"));

    // Connection 2 reuses packet id 1 for another message, not yet written.
    let mut second = accept(&listener, true).await;
    second
        .write_all(&publish_packet("/sensor/t", 1, b"C"))
        .await
        .expect("PUBLISH");
    assert!(wait_connected(&mut connection).await);
    let (c, ack_c) = next_message(&mut connection).await;
    assert_eq!(c, "C");

    // A and B are written only now: their acknowledgements must not reach connection 2.
    connection.ack(ack_a).await.expect("ack");
    connection.ack(ack_b).await.expect("ack");
    connection.barrier().await.expect("barrier");
    let (kind, _) = read_packet(&mut second).await;
    assert_eq!(
        kind, 10,
        "the barrier's UNSUBSCRIBE first: nothing acknowledged C before it was written"
    );
    connection.ack(ack_c).await.expect("ack");
    let (kind, body) = read_packet(&mut second).await;
    assert_eq!((kind, body), (4, vec![0, 1]), "PUBACK 1 for C");
}

#[tokio::test]
async fn an_acknowledgement_never_cancels_a_connection_attempt() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let mut connection = consumer(&listener);
    let mut first = accept(&listener, false).await;
    first
        .write_all(&publish_packet("/sensor/t", 1, b"A"))
        .await
        .expect("PUBLISH");
    let (_, ack_a) = next_message(&mut connection).await;
    drop(first);

    // While the driver waits for the CONNACK of its second connection, the service
    // acknowledges A. Before, that ended the attempt and the driver started another.
    let mut second = accept_connect(&listener).await;
    connection.ack(ack_a).await.expect("ack");
    tokio::task::yield_now().await;
    connack(&mut second, true).await;
    assert!(wait_connected(&mut connection).await);
    // The same socket carries on: it reads what the service sends next.
    connection.barrier().await.expect("barrier");
    let (kind, _) = read_packet(&mut second).await;
    assert_eq!(
        kind, 10,
        "UNSUBSCRIBE on the connection that was being made"
    );
}

#[tokio::test]
async fn acknowledgements_that_interrupt_a_wait_for_packets_lose_none() {
    // Each acknowledgement ends the driver's wait in `EventLoop::poll`; rumqttc's framed
    // reader keeps what it read meanwhile, so no message is lost to that.
    const MESSAGES: u16 = 300;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let mut connection = consumer(&listener);
    let mut stream = accept(&listener, false).await;
    let (mut reader, mut writer) = stream.split();
    let broker = async {
        for pkid in 1..=MESSAGES {
            // Half a packet, then the rest, so a read is often cut between the two.
            let packet = publish_packet("/sensor/t", pkid, pkid.to_string().as_bytes());
            let (head, tail) = packet.split_at(packet.len() / 2);
            writer.write_all(head).await.expect("write");
            tokio::task::yield_now().await;
            writer.write_all(tail).await.expect("write");
        }
        let mut acked = Vec::new();
        while acked.len() < usize::from(MESSAGES) {
            let mut packet = [0u8; 4];
            reader.read_exact(&mut packet).await.expect("PUBACK");
            assert_eq!(packet[..2], [0x40, 0x02], "PUBACK");
            acked.push(u16::from_be_bytes([packet[2], packet[3]]));
        }
        acked
    };
    let service = async {
        assert!(!wait_connected(&mut connection).await);
        let mut payloads = Vec::new();
        for _ in 0..MESSAGES {
            let (payload, ack) = next_message(&mut connection).await;
            payloads.push(payload);
            connection.ack(ack).await.expect("ack");
        }
        payloads
    };
    let (acked, payloads) = tokio::join!(broker, service);
    let expected: Vec<String> = (1..=MESSAGES).map(|n| n.to_string()).collect();
    assert_eq!(payloads, expected);
    assert_eq!(acked, (1..=MESSAGES).collect::<Vec<_>>());
}

#[test]
fn rumqttc_keeps_read_events_across_a_dropped_connection() {
    // What `Driver::lost` hands over: `MqttState::clean` leaves `events` alone.
    let mut state = rumqttc::MqttState::new(10, true);
    let mut publish = Publish::new("/sensor/t", QoS::AtLeastOnce, b"A".to_vec());
    publish.pkid = 7;
    state
        .handle_incoming_packet(Packet::Publish(publish))
        .expect("handled");
    let resend = state.clean();
    assert!(resend.is_empty());
    assert!(matches!(
        state.events.front(),
        Some(rumqttc::Event::Incoming(Packet::Publish(p))) if p.pkid == 7
    ));
}

#[test]
fn rumqttc_writes_a_manual_acknowledgement_as_given() {
    // What `Driver::write_outbound` relies on: with manual acknowledgements, an incoming
    // QoS 1 publish is not acknowledged by rumqttc, and a PubAck request becomes
    // exactly that packet.
    let mut state = rumqttc::MqttState::new(10, true);
    let mut publish = Publish::new("/sensor/t", QoS::AtLeastOnce, b"A".to_vec());
    publish.pkid = 9;
    let answer = state
        .handle_incoming_packet(Packet::Publish(publish))
        .expect("handled");
    assert!(answer.is_none(), "no automatic PUBACK");
    let packet = state
        .handle_outgoing_packet(Request::PubAck(PubAck::new(9)))
        .expect("handled");
    assert!(matches!(packet, Some(Packet::PubAck(ack)) if ack.pkid == 9));
}

#[tokio::test]
async fn a_service_far_behind_stops_the_reading_keeps_the_connection_and_loses_nothing() {
    // A broker that ignores its in-flight window, as Mosquitto 2.0.11 does when
    // acknowledgements come in batches: it writes every message at once.
    const MESSAGES: u16 = 3000;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let mut broker = settings(&listener);
    broker.keep_alive = Duration::from_secs(1);
    let mut options = broker.mqtt_options("ack-test", false).expect("options");
    options.set_manual_acks(true);
    let mut connection = Connection::start(&broker, options);
    let mut stream = accept(&listener, false).await;
    let mut everything = Vec::new();
    for pkid in 1..=MESSAGES {
        everything.extend(publish_packet(
            "/sensor/t",
            pkid,
            pkid.to_string().as_bytes(),
        ));
    }
    stream.write_all(&everything).await.expect("write");
    assert!(!wait_connected(&mut connection).await);

    // The service takes nothing: the driver reads up to the bound and stops there.
    let backlog = Arc::clone(&connection.backlog);
    let waiting = || backlog.reliable.load(Ordering::Relaxed);
    tokio::time::timeout(WAIT, async {
        while waiting() < MESSAGE_BACKLOG {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the driver reads up to the bound");
    // Meanwhile it writes the keep-alive pings itself, so the broker keeps it.
    let ping = tokio::time::timeout(WAIT, async {
        loop {
            if read_packet(&mut stream).await.0 == 12 {
                break;
            }
        }
    });
    ping.await.expect("a PINGREQ while not reading");
    assert_eq!(waiting(), MESSAGE_BACKLOG, "no message read past the bound");

    // Taken one at a time, every message comes, in order, never more than the bound
    // waiting.
    for expected in 1..=MESSAGES {
        assert!(waiting() <= MESSAGE_BACKLOG, "{} waiting", waiting());
        let (payload, _) = next_message(&mut connection).await;
        assert_eq!(payload, expected.to_string());
    }
}
