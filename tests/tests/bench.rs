//! The benchmark scripts stay runnable: smoke runs with tiny numbers and the debug
//! binaries must finish and print every table with a figure in every cell. (The figures
//! themselves are not checked: speed is measured by `bench/suite.sh`, not by tests.)

use std::process::Command;

use tests::{binary, cargo_package_variables, repo_root};

/// Runs `bench/<script>` with `env` and the debug binaries, asserts it succeeded, and
/// returns its stdout and stderr.
fn run_script(script: &str, env: &[(&str, &str)]) -> (String, String) {
    binary("mongo-persister"); // builds the debug binaries the smoke runs use
    let mut command = Command::new(repo_root().join("bench").join(script));
    command
        .current_dir(repo_root())
        .env("BENCH_PROFILE", "debug")
        .envs(env.iter().copied());
    for key in cargo_package_variables() {
        command.env_remove(key);
    }
    let output = command.output().expect("the script runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "bench/{script}:\n{stdout}\n{stderr}"
    );
    (stdout, stderr)
}

#[test]
fn the_relay_benchmark_measures_both_forwarders() {
    let (stdout, stderr) = run_script(
        "relay.sh",
        &[
            ("BENCH_RELAY_N", "300"),
            ("BENCH_RELAY_BACKLOG", "300"),
            ("BENCH_RUNS", "1"),
            ("BENCH_SECONDS", "0.3"),
            ("BENCH_RATES", "1000"),
        ],
    );
    for row in [
        "| forwarded readings/s (QoS 1 JSON, as fast as they go) | ",
        "| edge CPU, µs per reading (broker + relay) | ",
        "| edge bytes written to disk per reading | ",
        "| latency p50 at 1000 readings/s, ms | ",
        "| latency p99 at 1000 readings/s, ms | ",
        "| edge-relay | 3",
        "| the backlog drained into the cloud broker | readings/s |",
        "| idle | ",
        "| while the backlog fills (",
        "| the backlog on disk, 1 000 readings/s live | ",
        "| while it drains (",
    ] {
        assert!(stdout.contains(row), "no row {row:?} in:\n{stdout}");
    }
    for line in stdout
        .lines()
        .filter(|line| line.starts_with("| ") && !line.starts_with("| figure"))
    {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        assert!(
            cells.iter().all(|cell| !cell.is_empty()),
            "empty cell in {line:?}"
        );
    }
    assert!(!stderr.contains("Traceback"), "{stderr}");
}

/// Both cloud tiers (one Mosquitto broker, three NATS nodes), each with one and three
/// persisters: every figure, every CPU row and a limit for each, every reading stored
/// once (the script counts them and fails otherwise).
#[test]
#[ignore = "loses readings on Mosquitto with three $share persisters across the cloud broker's restart: Mosquitto 2.0 saves no shared subscription, so what the relay forwards before they subscribe again is dropped (docs/scaling-out.md); and 5 minutes long"]
fn the_cluster_benchmark_measures_both_cloud_tiers() {
    let (stdout, stderr) = run_script(
        "cluster.sh",
        &[
            ("BENCH_CLUSTER_N", "300"),
            ("BENCH_CLUSTER_BACKLOG", "300"),
            ("BENCH_RUNS", "1"),
            ("BENCH_SECONDS", "0.3"),
            ("BENCH_RATES", "1000"),
        ],
    );
    assert!(
        stdout.contains(
            "| figure | Mosquitto, 1 persister | Mosquitto, 3 persisters ($share) | NATS cluster, 1 persister | NATS cluster, 3 persisters |"
        ),
        "{stdout}"
    );
    for row in [
        "| readings/s, sensor to MongoDB (300 QoS 1 JSON, as fast as they go) | ",
        "| latency p50 at 1000 readings/s, ms (sensor to persister receipt) | ",
        "| latency p99 at 1000 readings/s, ms (sensor to persister receipt) | ",
        "| drain of 300: readings/s forwarded by the relay into the cloud tier | ",
        "| drain of 300: readings/s into MongoDB | ",
        "| persisters, all | ",
        "| database server | ",
        "| the machine (every process; ",
        "| where the limit is | ",
    ] {
        assert!(stdout.contains(row), "no row {row:?} in:\n{stdout}");
    }
    // A ratio to the baseline in every configuration's cell, the baseline's own too.
    let through = stdout
        .lines()
        .find(|line| line.starts_with("| readings/s, sensor to MongoDB"))
        .unwrap_or_else(|| panic!("no throughput row in:\n{stdout}"));
    assert_eq!(through.matches("×)").count(), 4, "{through}");
    for line in stdout.lines().filter(|line| line.starts_with("| ")) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        assert!(
            cells.iter().all(|cell| !cell.is_empty()),
            "empty cell in {line:?}"
        );
    }
    assert_eq!(
        stdout.matches("| where the limit is | ").count(),
        2,
        "{stdout}"
    );
    assert!(!stderr.contains("Traceback"), "{stderr}");
}

#[test]
fn the_benchmark_suite_runs_and_prints_every_table() {
    let (stdout, stderr) = run_script(
        "suite.sh",
        &[
            ("BENCH_N", "300"),
            ("BENCH_RUNS", "1"),
            ("BENCH_SECONDS", "0.3"),
            ("BENCH_RATES", "1000"),
            ("BENCH_PERSISTER_N", "100"),
            ("BENCH_DEVICES", "5"),
            ("BENCH_REPAIR_AFTER", "1"),
        ],
    );

    for row in [
        "| subscriber: drain 300 queued QoS 1 |",
        "| publisher: 300 at QoS 1 |",
        "| persister: 100 queued readings into ",
        "| `--ingest tasmota` (5 measurements each) | 500 |",
        "| default (flagged, raw kept) | 100 |",
        "| `--metrics-address` on | ",
        "| off | ",
        "| 300 (all kept) | ",
        "| 300 on disk too (`--replay-dir`, ",
        "Memory per reading kept: ",
        "| 1 | ", // the repair run's --repair-after
        "| 0 (none) | ",
        "| 1 | 10,000 | ",
        "| 1000 | edge broker, TLS bridge, cloud broker |",
        "| 1000 | reference: cloud broker alone |",
        "| mqtt-subscriber | 300 |",
        "| mongo-persister | 100 |",
        "| device-status | ",
        "| edge broker (mosquitto) | ",
    ] {
        assert!(stdout.contains(row), "no row {row:?} in:\n{stdout}");
    }
    // Every cell of every row holds something: no figure went missing.
    for line in stdout.lines().filter(|line| line.starts_with('|')) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        assert!(
            cells.iter().all(|cell| !cell.is_empty()),
            "empty cell in {line:?}"
        );
    }
    assert!(!stderr.contains("Traceback"), "{stderr}");
}

#[test]
fn the_soak_run_samples_every_process_and_finds_no_gap() {
    let (stdout, stderr) = run_script(
        "soak.sh",
        &[
            ("BENCH_SOAK_DURATION", "3s"),
            ("BENCH_SOAK_RATE", "200"),
            ("BENCH_SOAK_SAMPLE", "1"),
        ],
    );
    assert!(
        stdout.contains("readings gaps exit code 0 (nothing missing, nothing twice)"),
        "{stdout}\n{stderr}"
    );
    for process in [
        "edge-broker",
        "cloud-broker",
        "mongo-persister",
        "mqtt-subscriber",
        "device-status",
        "temperature-sensor",
        "pressure-sensor",
    ] {
        assert!(
            stdout.contains(&format!("| {process} | ")),
            "no row for {process}:\n{stdout}"
        );
    }
}

/// The peers benchmark runs each consumer (Node-RED's two flows load in the pinned
/// Node-RED and store every reading) and prints a full row for each.
#[test]
fn the_peers_benchmark_runs_every_consumer() {
    let (stdout, stderr) = run_script("peers.sh", &[("BENCH_PEERS_N", "200"), ("BENCH_RUNS", "1")]);
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|line| line.starts_with("| "))
        .collect();
    for consumer in [
        "| `mongo-persister` (batches of 500) |",
        "| `mongo-persister --batch-size 1` (one insert per message) |",
        "| Node-RED: `mqtt in` → `mongodb4` insertOne |",
        "| Node-RED: `mqtt in` → `join` (500 or 0.2 s) → `mongodb4` insertMany |",
        "| Python: paho-mqtt + pymongo `insert_many`",
        "| Python: the same, writing the persister's documents",
    ] {
        let row = rows
            .iter()
            .find(|row| row.starts_with(consumer))
            .unwrap_or_else(|| panic!("no row {consumer:?} in:\n{stdout}\n{stderr}"));
        // Every reading stored, once, by every consumer in the timed run.
        assert!(row.contains(" | 200 (200) | "), "{row}");
    }
    for line in &rows {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        assert!(
            cells.iter().all(|cell| !cell.is_empty()),
            "empty cell in {line:?}"
        );
        // Consumers that acknowledge after the write and key their documents lose
        // nothing and store nothing twice when SIGKILLed.
        if line.starts_with("| `mongo-persister`") || line.contains("persister's documents") {
            assert_eq!(cells.last(), Some(&"0, 0"), "{line}");
        }
    }
    assert!(!stderr.contains("Traceback"), "{stderr}");
}
