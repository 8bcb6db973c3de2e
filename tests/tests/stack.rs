//! The native stack (`scripts/dev-stack --dashboard`): from a fresh state to readings
//! in the database that `readings latest` shows and a dashboard connected to the cloud
//! broker, a second start refused while it runs, and a clean stop on Ctrl-C.

// Each test is one scenario, read top to bottom: the services' 80-line bound
// (clippy.toml) is not for them.
#![allow(clippy::too_many_lines)]

use std::time::Duration;

use tests::dashboard::http;
use tests::prometheus::query;
use tests::{binary, cargo_package_variables, free_port, repo_root, wait_for_within, Service};

/// `readings latest --format json` against `uri`, or an empty answer while the database
/// is not up yet.
fn latest(uri: &str) -> String {
    std::process::Command::new(binary("readings"))
        .args(["latest", "--format", "json", "--mongodb-timeout", "1"])
        .env_clear()
        .env("MONGODB_URI", uri)
        .current_dir(std::env::temp_dir())
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
        .unwrap_or_default()
}

/// One stack at a time: both share `.venv` and the machine's two cores.
static ONE_STACK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long a whole stack may take from its start to both sensors' first readings
/// stored: a dozen processes (the dashboard and Prometheus in one test) on two cores
/// beside the rest of the suite, and edge-relay, which starts with the brokers and, when
/// the cloud broker is slow to listen, waits out its reconnect backoff (up to 30 s)
/// before it forwards the first readings.
const STACK_START: Duration = Duration::from_secs(120);

/// The services' metrics listeners, each on a port of its own.
const METRICS_PORTS: [&str; 6] = [
    "PERSISTER_METRICS_PORT",
    "TEMPERATURE_METRICS_PORT",
    "PRESSURE_METRICS_PORT",
    "STATUS_METRICS_PORT",
    "SUBSCRIBER_METRICS_PORT",
    "RELAY_METRICS_PORT",
];

/// A free port for each of `names`.
fn free_ports<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<(&'a str, u16)> {
    names.into_iter().map(|name| (name, free_port())).collect()
}

fn stack(dir: &std::path::Path, ports: &[(&str, u16)]) -> tokio::process::Command {
    stack_with(dir, ports, &["--dashboard", "--monitoring"])
}

/// `scripts/dev-stack ARGS` in `dir`, on `ports`, building debug binaries.
fn stack_with(
    dir: &std::path::Path,
    ports: &[(&str, u16)],
    args: &[&str],
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(repo_root().join("scripts/dev-stack"));
    command
        .args(args)
        .current_dir(repo_root())
        .env_remove("MONGODB_URI")
        .env("STACK_DIR", dir.join("stack"))
        .env("ENV_FILE", dir.join("env"))
        .env("STACK_PROFILE", "debug")
        .envs(ports.iter().map(|(key, port)| (key, port.to_string())));
    // The stack builds the binaries itself: no rebuild for cargo's test variables.
    for key in cargo_package_variables() {
        command.env_remove(key);
    }
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_native_stack_stores_readings_and_stops_cleanly() {
    let _one = ONE_STACK.lock().await;
    binary("readings"); // builds the debug binaries the stack runs
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = free_ports(
        [
            "LOCAL_PORT",
            "CLOUD_PORT",
            "CLOUD_TLS_PORT",
            "MONGO_PORT",
            "NODERED_PORT",
            "PROMETHEUS_PORT",
            "LOCAL_EXPORTER_PORT",
            "CLOUD_EXPORTER_PORT",
        ]
        .into_iter()
        .chain(METRICS_PORTS),
    );
    let uri = format!("mongodb://127.0.0.1:{}", ports[3].1);
    let mut running = Service::spawn("dev-stack", stack(dir.path(), &ports));

    let stored = wait_for_within(
        STACK_START,
        "both sensors' readings in the database",
        || async { latest(&uri) },
        |out| out.contains("/sensor/temperature") && out.contains("/sensor/pressure"),
    )
    .await;
    assert!(stored.contains("temp-0001"), "{stored}");
    // edge-relay carried them, not Mosquitto's bridge.
    running
        .wait_for_stdout("subscribed on the cloud broker to replay requests")
        .await;
    let brokers = std::fs::read_to_string(dir.path().join("stack/broker-dir")).expect("broker-dir");
    let edge = std::path::Path::new(brokers.trim()).join("mosquitto/local/mosquitto.conf");
    let edge = std::fs::read_to_string(edge).expect("the edge broker's configuration");
    assert!(
        !edge.contains("connection "),
        "the edge broker runs a bridge"
    );
    // The dashboard logged in to the cloud broker with the password from the env file,
    // and serves its page.
    running.wait_for_stdout("Connected to broker").await;
    let (status, page) = http(ports[4].1, "GET", "/dashboard/", &[], None).await;
    assert_eq!(status, 200, "{page}");
    assert!(
        dir.path().join("env").is_file(),
        "no env file made from .env.example"
    );
    // --monitoring: Prometheus with monitoring/ scrapes every service and both brokers'
    // exporters, and sees readings written.
    let prometheus = ports[5].1;
    wait_for_within(
        Duration::from_secs(60),
        "Prometheus scraping all 8 targets",
        || query(prometheus, "count(up == 1)"),
        |up| *up == Some(8.0),
    )
    .await;
    let written = query(prometheus, "sum(iot_persister_documents_written_total)").await;
    assert!(written.is_some_and(|n| n > 0.0), "{written:?}");

    let mut second = Service::spawn("second dev-stack", stack(dir.path(), &ports));
    let status = second.wait_exit().await;
    assert_eq!(status.code(), Some(1), "{}", second.stderr());
    assert!(
        second.stderr().contains("already running"),
        "{}",
        second.stderr()
    );

    running.interrupt().await;
    let output = running.stdout_lines().join("\n");
    assert!(output.contains("status offline"), "{output}");
    assert!(
        output.contains("mongo-persister.1 stopped (rc=0)"),
        "{output}"
    );
    assert!(
        !output.contains("SIGKILL"),
        "something had to be killed:\n{output}"
    );
}

/// `scripts/dev-stack --cloud nats`: the cloud on three NATS nodes (TLS) in place of the
/// cloud Mosquitto; both sensors' readings stored, and a clean stop on Ctrl-C.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_native_stack_runs_its_cloud_on_three_nats_nodes() {
    let _one = ONE_STACK.lock().await;
    binary("readings"); // builds the debug binaries the stack runs
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = free_ports(
        ["LOCAL_PORT", "CLOUD_PORT", "CLOUD_TLS_PORT", "MONGO_PORT"]
            .into_iter()
            .chain(METRICS_PORTS),
    );
    let list = || format!("{} {} {}", free_port(), free_port(), free_port());
    let mut command = stack_with(dir.path(), &ports, &["--cloud", "nats"]);
    command
        .env("NATS_PORTS", list())
        .env("NATS_ROUTE_PORTS", list())
        .env("NATS_MONITOR_PORTS", list());
    let uri = format!("mongodb://127.0.0.1:{}", ports[3].1);
    let mut running = Service::spawn("dev-stack --cloud nats", command);
    let stored = wait_for_within(
        STACK_START,
        "both sensors' readings in the database",
        || async { latest(&uri) },
        |out| out.contains("/sensor/temperature") && out.contains("/sensor/pressure"),
    )
    .await;
    assert!(stored.contains("temp-0001"), "{stored}");
    let output = running.stdout_lines().join("\n");
    assert!(
        output.contains("edge-relay-nats") && output.contains("(TLS)"),
        "the relay does not forward into NATS over TLS:\n{output}"
    );
    assert!(
        !output.contains("mosquitto-cloud"),
        "the cloud Mosquitto runs:\n{output}"
    );

    running.interrupt().await;
    let output = running.stdout_lines().join("\n");
    assert!(output.contains("status offline"), "{output}");
    for process in ["mongo-persister-nats", "edge-relay-nats", "nats-cloud"] {
        assert!(
            output.contains(&format!("{process}.1 stopped (rc=0)")),
            "{process} did not stop cleanly:\n{output}"
        );
    }
    assert!(
        !output.contains("SIGKILL"),
        "something had to be killed:\n{output}"
    );
}

/// Removes the folder outside the checkout where dev-stack, run as root, keeps the
/// brokers' files when the `mosquitto` user cannot enter the checkout: one per
/// checkout path, so one per run of this test.
struct BrokerStateOutside(std::path::PathBuf);

impl Drop for BrokerStateOutside {
    fn drop(&mut self) {
        let digest = std::process::Command::new("sh")
            .arg("-c")
            .arg("printf '%s' \"$1\" | sha256sum | cut -c1-12")
            .arg("sh")
            .arg(&self.0)
            .output();
        if let Ok(digest) = digest {
            let id = String::from_utf8_lossy(&digest.stdout).trim().to_string();
            if !id.is_empty() {
                let _ =
                    std::fs::remove_dir_all(std::path::Path::new("/var/lib/iot-pipeline").join(id));
            }
        }
    }
}

/// The first start of a fresh checkout in a folder only its owner may enter (root's
/// home on a fresh server): every reading of both sensors is stored from seq 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_checkout_in_a_private_folder_stores_every_reading_from_the_first() {
    let _one = ONE_STACK.lock().await;
    let readings = binary("readings");
    let home = tempfile::Builder::new()
        .prefix("iot-home-")
        .tempdir()
        .expect("tempdir");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod 0700");
    }
    let checkout = home.path().join("iot");
    tests::copy_checkout(&checkout);
    let _brokers_state = BrokerStateOutside(checkout.join(".data"));
    // What scripts/test installed already (honcho among it).
    std::os::unix::fs::symlink(repo_root().join(".venv"), checkout.join(".venv"))
        .expect("symlink .venv");
    let ports = free_ports(
        ["LOCAL_PORT", "CLOUD_PORT", "CLOUD_TLS_PORT", "MONGO_PORT"]
            .into_iter()
            .chain(METRICS_PORTS),
    );
    let uri = format!("mongodb://127.0.0.1:{}", ports[3].1);
    let start = || {
        let mut command = tokio::process::Command::new(checkout.join("scripts/dev-stack"));
        command
            .current_dir(&checkout)
            .env_remove("MONGODB_URI")
            .env_remove("STACK_DIR")
            .env_remove("ENV_FILE")
            // The binaries of this build: the copy would otherwise build them all again.
            .env(
                "STACK_BIN",
                readings.parent().expect("the binaries' folder"),
            )
            .envs(ports.iter().map(|(key, port)| (key, port.to_string())));
        for key in cargo_package_variables() {
            command.env_remove(key);
        }
        Service::spawn("dev-stack", command)
    };
    // `readings gaps`: its exit code, and each sensor's boots with their first seq.
    let gaps = || {
        let output = std::process::Command::new(&readings)
            .args(["gaps", "--format", "json"])
            .env_clear()
            .env("MONGODB_URI", &uri)
            .current_dir(std::env::temp_dir())
            .output()
            .expect("readings gaps");
        let report = String::from_utf8_lossy(&output.stdout).into_owned();
        let rows: Vec<serde_json::Value> = serde_json::from_str(&report).unwrap_or_default();
        let firsts = |device: &str| -> Vec<i64> {
            rows.iter()
                .filter(|row| row["device"] == device)
                .filter_map(|row| row["first"].as_i64())
                .collect()
        };
        (
            output.status.code(),
            [firsts("temp-0001"), firsts("pres-0001")],
            report,
        )
    };
    let stop = |mut running: Service| async move {
        running.interrupt().await;
        let output = running.stdout_lines().join("\n");
        for process in ["mongo-persister", "temperature-sensor", "pressure-sensor"] {
            assert!(
                output.contains(&format!("{process}.1 stopped (rc=0)")),
                "{process} did not stop cleanly:\n{output}"
            );
        }
        running
    };

    let running = start();
    wait_for_within(
        STACK_START,
        "both sensors' readings in the database",
        || async { latest(&uri) },
        |out| out.contains("/sensor/temperature") && out.contains("/sensor/pressure"),
    )
    .await;
    let (code, firsts, report) = gaps();
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(
        firsts,
        [vec![1], vec![1]],
        "a sensor lost its first readings: {report}"
    );
    let running = stop(running).await;
    assert!(
        running
            .stderr()
            .contains("brokers' configuration, certificates and data: "),
        "dev-stack does not say where the brokers' files are:\n{}",
        running.stderr()
    );

    // Started again on the state it left: a second boot of each sensor, from seq 1 too.
    let running = start();
    let (code, firsts, report) = wait_for_within(
        STACK_START,
        "a second boot of both sensors stored",
        || async { gaps() },
        |(_, firsts, _)| firsts.iter().all(|boots| boots.len() == 2),
    )
    .await;
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(firsts, [vec![1, 1], vec![1, 1]], "{report}");
    stop(running).await;
}
