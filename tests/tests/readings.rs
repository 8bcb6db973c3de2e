//! End-to-end tests of `readings` on its own: the real binary against a real
//! MongoDB-wire-protocol server, over readings written at known times, for the answers
//! that depend on the server (bucket arithmetic) and for its command line.

use bson::{doc, Document};
use tests::{readings_with_code, spawn_mongo, MongoServer};

/// Runs `readings` on the test's database; its exit code, stdout and stderr.
fn readings(mongo: &MongoServer, args: &[&str]) -> (Option<i32>, String, String) {
    readings_with_code(mongo.uri(), mongo.database_name(), args)
}

/// 2026-01-01T00:00:00Z plus `seconds`.
fn at(seconds: i64) -> bson::DateTime {
    bson::DateTime::from_millis((1_767_225_600 + seconds) * 1000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_buckets_of_any_width_start_at_whole_multiples_of_it() {
    let mongo = spawn_mongo().await;
    // Each reading's value is its second after midnight, so min and max say which
    // readings a bucket holds.
    let seconds = [0, 10, 89, 90, 100, 179, 180, 400, 425, 3_599];
    let documents: Vec<Document> = seconds
        .iter()
        .map(|&second| doc! { "topic": "/sensor/pressure", "value": second as f64, "ts": at(second), "received_at": at(second) })
        .collect();
    let db = mongo.database().await;
    db.collection::<Document>("readings")
        .insert_many(documents)
        .await
        .expect("insert");
    let stats = |every: &str| {
        let (code, out, err) = readings(
            &mongo,
            &[
                "stats",
                "--topic",
                "/sensor/pressure",
                "--since",
                "2026-01-01T00:00:00Z",
                "--until",
                "2026-01-01T01:00:00Z",
                "--every",
                every,
                "--format",
                "csv",
            ],
        );
        assert_eq!(code, Some(0), "{err}");
        out
    };
    assert_eq!(
        stats("90s"),
        "bucket,count,min,avg,max\n\
         2026-01-01T00:00:00.000Z,3,0.0,33.0,89.0\n\
         2026-01-01T00:01:30.000Z,3,90.0,123.0,179.0\n\
         2026-01-01T00:03:00.000Z,1,180.0,180.0,180.0\n\
         2026-01-01T00:06:00.000Z,2,400.0,412.5,425.0\n\
         2026-01-01T00:58:30.000Z,1,3599.0,3599.0,3599.0\n"
    );
    assert_eq!(
        stats("7m"),
        "bucket,count,min,avg,max\n\
         2026-01-01T00:00:00.000Z,8,0.0,131.0,400.0\n\
         2026-01-01T00:07:00.000Z,1,425.0,425.0,425.0\n\
         2026-01-01T00:56:00.000Z,1,3599.0,3599.0,3599.0\n"
    );
    let hourly = stats("1h");
    assert_eq!(
        hourly.lines().nth(1),
        Some("2026-01-01T00:00:00.000Z,10,0.0,507.2,3599.0"),
        "{hourly}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_refuses_what_cannot_be_answered_and_cuts_wide_cells() {
    let mongo = spawn_mongo().await;
    // A minute ago: nx-27017 does not always return a reading of the last second from
    // a window that ends now.
    let now = bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis() - 60_000);
    let long_device = "d".repeat(60_000);
    mongo
        .database()
        .await
        .collection::<Document>("readings")
        .insert_many([
            doc! { "topic": "/sensor/t", "device": "temp-0001", "measurement": "t", "value": 21.5, "ts": now, "received_at": now },
            doc! { "topic": "/sensor/t", "device": &long_device, "measurement": "t", "value": 22.5, "ts": now, "received_at": now },
        ])
        .await
        .expect("insert");

    // A negative duration reads as "ago", like the positive one.
    for since in ["-5m", "5m"] {
        let (code, out, err) = readings(
            &mongo,
            &["range", "--device", "temp-0001", "--since", since],
        );
        assert_eq!(code, Some(0), "--since {since}: {err}");
        assert!(out.contains("21.5"), "--since {since}: {out}");
    }

    // An end before the start, or a limit of nothing: one line naming the flags, exit 2.
    for args in [
        &[
            "stats",
            "--topic",
            "/sensor/t",
            "--since",
            "1h",
            "--until",
            "2h",
        ][..],
        &["range", "--topic", "/sensor/t", "--limit", "0"][..],
    ] {
        let (code, out, err) = readings(&mongo, args);
        assert_eq!(code, Some(2), "{args:?}: {out}{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?}: {out}");
        let named = if args.contains(&"--limit") {
            "--limit"
        } else {
            "--until"
        };
        assert!(err.contains(named), "{args:?}: {err}");
    }

    // A 60 000-character device name: the table stays readable, JSON keeps it whole.
    let (code, out, err) = readings(&mongo, &["latest"]);
    assert_eq!(code, Some(0), "{err}");
    let widest = out.lines().map(|line| line.chars().count()).max();
    assert!(widest < Some(300), "a line of {widest:?} characters");
    assert!(out.contains('…') && out.contains("temp-0001"), "{out}");
    let (code, out, err) = readings(&mongo, &["latest", "--format", "json"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains(&long_device));
}
