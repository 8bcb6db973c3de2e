//! The Docker tier: the compose stack as users run it, on a real Docker engine, from a
//! fresh copy of the repository (its tracked files, as a clone has them):
//! `scripts/new-env && docker compose up --build -d`, then what a user checks: every
//! service healthy, readings stored once and from seq 1 through restarts, kills, a cut
//! and a bad edge–cloud link, `down`/`up` and `down -v`, the override files, the
//! dashboard and monitoring profiles, and what the stack exposes on the host.
//!
//! The compose files publish fixed host ports (1883, 8883, 27017, 1880, 9090), so these
//! tests run one at a time. The image is built by the first `up --build` of the run; the
//! others find every layer in the engine's cache. Without a Docker engine each test is
//! skipped and counted so (`IOT_DOCKER_REQUIRED=1`, set by `.ci/run`, makes that a
//! failure instead). `IOT_DOCKER_KEEP=1` leaves a failed stack up for a look.

// Each test is one scenario, read top to bottom: the services' 80-line bound
// (clippy.toml) is not for them.
#![allow(clippy::too_many_lines)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};

use std::time::{Duration, Instant};

use bson::{doc, Document};
use futures_util::TryStreamExt;
use tests::dashboard::Browser;
use tests::skipped;

/// `docker ARGS...` under a time limit, so that no call of the tier hangs it (an `up`
/// waiting on a dependency that never becomes healthy, say): ten minutes for a build,
/// two for anything else.
fn docker(first: &str) -> Command {
    let limit = if first == "compose" { "600" } else { "120" };
    let mut command = Command::new("timeout");
    command.args(["--kill-after=10", limit, "docker", first]);
    command
}

/// Projects this tier makes; one an interrupted run left behind would hold the ports.
const PROJECTS: [&str; 6] = [
    "iot-tier-build",
    "iot-tier-default",
    "iot-tier-bridge",
    "iot-tier-replicas",
    "iot-tier-example-env",
    "iot-tier-cluster",
];

/// One stack at a time: they share the host's published ports.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The lock of the tier, or `None` (the test recorded as skipped) without an engine.
async fn tier() -> Option<tokio::sync::MutexGuard<'static, ()>> {
    let engine = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output();
    let why = match engine {
        Ok(output) if output.status.success() => {
            let compose = Command::new("docker").args(["compose", "version"]).output();
            if compose.is_ok_and(|output| output.status.success()) {
                None
            } else {
                Some("no Compose v2 plugin (`docker compose`)".to_string())
            }
        }
        Ok(output) => Some(format!(
            "no Docker engine answers: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )),
        Err(error) => Some(format!("no docker command: {error}")),
    };
    if let Some(why) = why {
        assert!(
            std::env::var_os("IOT_DOCKER_REQUIRED").is_none(),
            "IOT_DOCKER_REQUIRED is set, but {why}"
        );
        skipped(&format!("the Docker tier needs an engine: {why}"));
        return None;
    }
    let tier = ONE_AT_A_TIME.lock().await;
    static CLEARED: std::sync::Once = std::sync::Once::new();
    CLEARED.call_once(|| {
        for project in PROJECTS {
            let _ = docker("compose")
                .args([
                    "-p",
                    project,
                    "down",
                    "-v",
                    "--remove-orphans",
                    "--timeout",
                    "5",
                ])
                .output();
        }
    });
    Some(tier)
}

/// Every long-running service of the default stack, with a healthcheck each.
const HEALTHY: [&str; 9] = [
    "mosquitto-cloud",
    "mosquitto-local",
    "edge-relay",
    "mongo",
    "mongo-persister",
    "temperature-sensor",
    "pressure-sensor",
    "device-status",
    "mqtt-subscriber",
];

/// The producers of the default stack: JSON readings at QoS 1.
const SENSORS: [&str; 2] = ["temperature-sensor", "pressure-sensor"];

/// One compose project in a fresh copy of the repository, taken down with its volumes
/// when dropped.
struct Stack {
    _dir: tempfile::TempDir,
    root: PathBuf,
    project: String,
    files: Vec<&'static str>,
    profiles: Vec<&'static str>,
}

impl Stack {
    /// Copies the repository's files (tracked, and new ones not ignored) into a new
    /// folder and makes its `.env` with `scripts/new-env`, as a user does.
    fn fresh(project: &str, files: &[&'static str], profiles: &[&'static str]) -> Stack {
        let dir = tempfile::Builder::new()
            .prefix("iot-docker-")
            .tempdir()
            .expect("tempdir");
        let root = dir.path().join("pipeline");
        std::fs::create_dir(&root).expect("copy's folder");
        tests::copy_checkout(&root);
        let made = Command::new("scripts/new-env")
            .current_dir(&root)
            .output()
            .expect("scripts/new-env runs");
        assert!(
            made.status.success(),
            "scripts/new-env: {}",
            String::from_utf8_lossy(&made.stderr)
        );
        let stack = Stack {
            _dir: dir,
            root,
            project: project.to_string(),
            files: files.to_vec(),
            profiles: profiles.to_vec(),
        };
        // A project of an earlier, interrupted run would hold the ports.
        stack.compose(&["down", "-v", "--remove-orphans"]);
        stack
    }

    /// `docker compose` on this stack's files and profiles.
    fn command(&self) -> Command {
        let mut command = docker("compose");
        command
            .current_dir(&self.root)
            .args(["-p", &self.project])
            .args(self.files.iter().flat_map(|file| ["-f", file]))
            .args(self.profiles.iter().flat_map(|p| ["--profile", p]));
        command
    }

    fn compose(&self, args: &[&str]) -> Output {
        self.command()
            .args(args)
            .output()
            .expect("docker compose runs")
    }

    /// Runs `docker compose ARGS`, asserting success; its stdout.
    fn compose_ok(&self, args: &[&str]) -> String {
        let output = self.compose(args);
        assert!(
            output.status.success(),
            "docker compose {}: {}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `up --build -d`, then every service in `healthy` healthy; the time that took.
    fn up(&self, healthy: &[&str]) -> Duration {
        let started = Instant::now();
        self.compose_ok(&["up", "--build", "-d"]);
        self.wait_healthy(healthy, Duration::from_secs(240));
        started.elapsed()
    }

    /// The id of `service`'s container (running or not).
    fn container(&self, service: &str) -> String {
        let id = self.compose_ok(&["ps", "-a", "-q", service]);
        let id = id.lines().next().unwrap_or_default().trim().to_string();
        assert!(!id.is_empty(), "{service} has no container");
        id
    }

    /// Each service's state and health (`running healthy`, `exited `, ...).
    fn states(&self) -> BTreeMap<String, String> {
        let ids = self.compose_ok(&["ps", "-a", "-q"]);
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if ids.is_empty() {
            return BTreeMap::new();
        }
        let output = docker("inspect")
            .args(["--format", "{{index .Config.Labels \"com.docker.compose.service\"}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}"])
            .args(&ids)
            .output()
            .expect("docker inspect");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| {
                let (service, state) = line.split_once(' ')?;
                Some((service.to_string(), state.trim().to_string()))
            })
            .collect()
    }

    fn wait_healthy(&self, services: &[&str], within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let states = self.states();
            let unhealthy: Vec<String> = services
                .iter()
                .filter(|service| {
                    states.get(**service).map(String::as_str) != Some("running healthy")
                })
                .map(|service| format!("{service}: {:?}", states.get(*service)))
                .collect();
            if unhealthy.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not healthy within {within:?}: {unhealthy:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// The last lines of every service's log, for a failure's message.
    fn logs(&self) -> String {
        let output = self.compose(&["logs", "--no-color", "--tail", "30"]);
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// A value of the stack's `.env`.
    fn env(&self, key: &str) -> String {
        let text = std::fs::read_to_string(self.root.join(".env")).expect(".env");
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!(".env has no {key}"))
            .to_string()
    }

    /// The pipeline's database, as the application user, on the host's 27017.
    async fn database(&self) -> mongodb::Database {
        let name = self.env("MONGODB_DATABASE");
        let uri = format!(
            "mongodb://{}:{}@127.0.0.1:27017/?authSource={name}&serverSelectionTimeoutMS=5000",
            self.env("MONGO_APP_USERNAME"),
            self.env("MONGO_APP_PASSWORD")
        );
        mongodb::Client::with_uri_str(&uri)
            .await
            .expect("a MongoDB client")
            .database(&name)
    }

    /// `docker compose run --rm readings ARGS`: its stdout.
    fn readings(&self, args: &[&str]) -> String {
        let mut command = vec!["run", "--rm", "-T", "readings"];
        command.extend_from_slice(args);
        self.compose_ok(&command)
    }

    /// A metric of `service`'s /metrics (inside its container), summed over labels.
    fn metric(&self, service: &str, name: &str) -> Option<f64> {
        let output = self.compose(&[
            "exec",
            "-T",
            service,
            "curl",
            "-fsS",
            "--max-time",
            "10",
            "http://127.0.0.1:9464/metrics",
        ]);
        let text = String::from_utf8_lossy(&output.stdout);
        let values: Vec<f64> = text
            .lines()
            .filter(|line| {
                line.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse().ok())
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    }

    /// The host PID of `service`'s main process, for its network namespace.
    fn pid(&self, service: &str) -> String {
        let output = docker("inspect")
            .args(["--format", "{{.State.Pid}}", &self.container(service)])
            .output()
            .expect("docker inspect");
        let pid = String::from_utf8_lossy(&output.stdout).trim().to_string();
        assert!(
            output.status.success() && pid.parse::<u32>().is_ok_and(|pid| pid > 0),
            "{service} has no running process: {pid}"
        );
        pid
    }

    /// The compose network `name` of this project (`<project>_<name>`).
    fn network(&self, name: &str) -> String {
        format!("{}_{name}", self.project)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
            if std::env::var_os("IOT_DOCKER_KEEP").is_some() {
                eprintln!(
                    "IOT_DOCKER_KEEP: left up as project {} in {}",
                    self.project,
                    self.root.display()
                );
                let dir = std::mem::replace(&mut self._dir, tempfile::tempdir().expect("tempdir"));
                let _ = dir.keep();
                return;
            }
        }
        let _ = self.compose(&["down", "-v", "--remove-orphans", "--timeout", "5"]);
    }
}

/// One device's readings of one boot, as stored.
#[derive(Debug)]
struct Boot {
    device: String,
    boot: String,
    stored: i64,
    distinct: i64,
    first: i64,
    last: i64,
}

impl Boot {
    /// Stored once each, from seq 1, no seq missing.
    fn is_whole(&self) -> bool {
        self.stored == self.distinct && self.first == 1 && self.last == self.distinct
    }
}

/// Every boot of the sensors' readings (those with a device, boot and seq), counted
/// here rather than by an aggregation: the tier asserts what is stored, whatever
/// MongoDB-compatible server runs in the `mongo` service.
async fn boots(db: &mongodb::Database) -> Vec<Boot> {
    let filter = doc! {
        "topic": { "$in": ["/sensor/temperature", "/sensor/pressure"] },
        "seq": { "$exists": true },
    };
    let Ok(cursor) = db
        .collection::<Document>(iot_store::READINGS)
        .find(filter)
        .projection(doc! { "device": 1, "boot": 1, "seq": 1, "_id": 0 })
        .await
    else {
        return Vec::new();
    };
    let documents: Vec<Document> = cursor.try_collect().await.unwrap_or_default();
    let mut seqs: BTreeMap<(String, String), Vec<i64>> = BTreeMap::new();
    for document in &documents {
        let text = |key: &str| document.get_str(key).unwrap_or_default().to_string();
        let seq = match document.get("seq") {
            Some(bson::Bson::Int32(seq)) => i64::from(*seq),
            Some(bson::Bson::Int64(seq)) => *seq,
            Some(bson::Bson::Double(seq)) => *seq as i64,
            _ => -1,
        };
        seqs.entry((text("device"), text("boot")))
            .or_default()
            .push(seq);
    }
    seqs.into_iter()
        .map(|((device, boot), mut seqs)| {
            let stored = seqs.len() as i64;
            seqs.sort_unstable();
            seqs.dedup();
            Boot {
                device,
                boot,
                stored,
                distinct: seqs.len() as i64,
                first: seqs.first().copied().unwrap_or(-1),
                last: seqs.last().copied().unwrap_or(-1),
            }
        })
        .collect()
}

/// Stops the sensors (they finish cleanly), then waits until every boot stored so far
/// is whole: each reading once, from seq 1, none missing (repairs included). Panics
/// on a reading stored twice at once: no wait undoes that. The boots.
async fn stored_once(stack: &Stack, step: &str) -> Vec<Boot> {
    let boots = whole_boots(stack, step).await;
    let gaps = stack.readings(&["gaps", "--format", "json"]);
    let gaps: serde_json::Value = serde_json::from_str(gaps.trim())
        .unwrap_or_else(|e| panic!("{step}: readings gaps --format json: {e}: {gaps}"));
    // One row per boot: each from seq 1, none missing, none twice.
    let rows = gaps.as_array().cloned().unwrap_or_default();
    assert_eq!(rows.len(), boots.len(), "{step}: readings gaps: {gaps}");
    for row in rows {
        assert!(
            row["first"] == 1 && row["missing"] == 0 && row["duplicates"] == 0,
            "{step}: readings gaps: {row}"
        );
    }
    eprintln!("{step}: stored once, from seq 1: {boots:?}");
    boots
}

/// Stops the sensors, then waits until every boot stored so far (of both sensors) is
/// whole: each reading once, from seq 1, none missing. Panics on a reading stored
/// twice. The boots.
async fn whole_boots(stack: &Stack, step: &str) -> Vec<Boot> {
    let mut stop = vec!["stop"];
    stop.extend(SENSORS);
    stack.compose_ok(&stop);
    let db = stack.database().await;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let boots = boots(&db).await;
        let twice: Vec<&Boot> = boots.iter().filter(|b| b.stored != b.distinct).collect();
        assert!(twice.is_empty(), "{step}: readings stored twice: {twice:?}");
        let devices: std::collections::BTreeSet<&str> =
            boots.iter().map(|b| b.device.as_str()).collect();
        if devices.len() >= 2 && boots.iter().all(Boot::is_whole) {
            return boots;
        }
        assert!(
            Instant::now() < deadline,
            "{step}: not every reading stored once from seq 1 within 180 s: {boots:?}\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Starts the sensors again (a new boot each).
fn start_sensors(stack: &Stack) {
    let mut start = vec!["start"];
    start.extend(SENSORS);
    stack.compose_ok(&start);
}

/// How many readings of `/sensor/#` are stored.
async fn count(db: &mongodb::Database) -> u64 {
    db.collection::<Document>(iot_store::READINGS)
        .count_documents(doc! { "topic": { "$regex": "^/sensor/" } })
        .await
        .unwrap_or(0)
}

/// Waits until more than `than` readings are stored; the count.
async fn stored_more_than(db: &mongodb::Database, than: u64, within: Duration) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        let stored = count(db).await;
        if stored > than {
            return stored;
        }
        assert!(
            Instant::now() < deadline,
            "no new readings stored within {within:?} ({stored})"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `mosquitto_pub` of a reading on `/sensor/temperature` to the host's `port`: its exit
/// status and stderr.
fn publish_on_host(port: u16, extra: &[&str]) -> (bool, String) {
    publish_to_host(port, "/sensor/temperature", extra)
}

fn publish_to_host(port: u16, topic: &str, extra: &[&str]) -> (bool, String) {
    let output = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-t", topic, "-m", "21.50", "-q", "1"])
        .args(extra)
        .output()
        .expect("mosquitto_pub runs (apt-get install mosquitto-clients)");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Every host port the project's containers publish: `ip:port`.
fn published(stack: &Stack) -> Vec<String> {
    let ids = stack.compose_ok(&["ps", "-q"]);
    let mut ports = Vec::new();
    for id in ids.split_whitespace() {
        let output = docker("inspect")
            .args(["--format", "{{range $p, $b := .NetworkSettings.Ports}}{{range $b}}{{.HostIp}}:{{.HostPort}}->{{$p}} {{end}}{{end}}", id])
            .output()
            .expect("docker inspect");
        ports.extend(
            String::from_utf8_lossy(&output.stdout)
                .split_whitespace()
                .map(String::from),
        );
    }
    ports.sort();
    ports.dedup();
    ports
}

/// The images build from a fresh copy: `scripts/test` runs this first and alone, so that
/// the other tests' `up --build` find every layer in the cache.
#[tokio::test]
async fn docker_tier_the_images_build_from_a_fresh_copy() {
    let Some(_tier) = tier().await else { return };
    let stack = Stack::fresh("iot-tier-build", &["compose.yaml"], &["dashboard"]);
    let started = Instant::now();
    stack.compose_ok(&["build"]);
    eprintln!("images built in {:?}", started.elapsed());
    for image in ["iot-pipeline:local", "iot-pipeline-nodered:local"] {
        let found = docker("image")
            .args(["inspect", "--format", "{{.Config.User}}", image])
            .output()
            .expect("docker image inspect");
        let user = String::from_utf8_lossy(&found.stdout).trim().to_string();
        assert!(found.status.success(), "{image} was not built");
        assert!(
            !user.is_empty() && user != "root" && user != "0",
            "{image} runs as {user:?}"
        );
    }
}

/// A bad link on one interface of a container's network namespace: 300 ms ± 100 ms of
/// delay and 3 % loss (`tc netem`). Where the kernel has no netem, a slow, lossy link
/// with what it has: 3 % of packets dropped each way (iptables' `statistic` match) and
/// 64 kbit/s (`tc tbf`, which queues up to 300 ms).
struct BadLink {
    pid: String,
    interface: String,
    netem: bool,
}

impl BadLink {
    fn run(pid: &str, command: &[&str]) -> Output {
        Command::new("nsenter")
            .args(["-t", pid, "-n"])
            .args(command)
            .output()
            .expect("nsenter runs")
    }

    fn apply(pid: &str, interface: &str) -> BadLink {
        let netem = Self::run(
            pid,
            &[
                "tc", "qdisc", "add", "dev", interface, "root", "netem", "delay", "300ms", "100ms",
                "loss", "3%",
            ],
        );
        let link = BadLink {
            pid: pid.to_string(),
            interface: interface.to_string(),
            netem: netem.status.success(),
        };
        if link.netem {
            eprintln!("bad link: tc netem delay 300ms 100ms loss 3% on {interface}");
            return link;
        }
        eprintln!(
            "bad link: no netem in this kernel ({}): 3 % loss each way and 64 kbit/s on {interface} instead",
            String::from_utf8_lossy(&netem.stderr).trim()
        );
        for rule in link.loss_rules() {
            let mut command = vec!["iptables", "-A"];
            command.extend(rule);
            let output = Self::run(pid, &command);
            assert!(
                output.status.success(),
                "{command:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let output = Self::run(
            pid,
            &[
                "tc", "qdisc", "add", "dev", interface, "root", "tbf", "rate", "64kbit", "burst",
                "4kb", "latency", "300ms",
            ],
        );
        assert!(
            output.status.success(),
            "tc tbf: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        link
    }

    fn loss_rules(&self) -> [Vec<&str>; 2] {
        let drop = [
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            "0.03",
            "-j",
            "DROP",
        ];
        [
            [&["OUTPUT", "-o", self.interface.as_str()][..], &drop[..]].concat(),
            [&["INPUT", "-i", self.interface.as_str()][..], &drop[..]].concat(),
        ]
    }

    fn remove(self) {
        let output = Self::run(
            &self.pid,
            &["tc", "qdisc", "del", "dev", &self.interface, "root"],
        );
        assert!(
            output.status.success(),
            "tc qdisc del: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        if !self.netem {
            for rule in self.loss_rules() {
                let mut command = vec!["iptables", "-D"];
                command.extend(rule);
                let output = Self::run(&self.pid, &command);
                assert!(
                    output.status.success(),
                    "{command:?}: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_tier_the_stack_as_users_run_it_keeps_every_reading_once() {
    let Some(_tier) = tier().await else { return };
    let stack = Stack::fresh(
        "iot-tier-default",
        &["compose.yaml"],
        &["dashboard", "monitoring"],
    );

    // Fresh start: every service healthy, the first readings stored.
    let mut healthy: Vec<&str> = HEALTHY.to_vec();
    healthy.push("nodered");
    let took = stack.up(&healthy);
    eprintln!("fresh start: every service healthy {took:?} after `up --build -d`");
    let db = stack.database().await;
    stored_more_than(&db, 0, Duration::from_secs(60)).await;
    let latest = stack.readings(&["latest"]);
    for topic in ["/sensor/temperature", "/sensor/pressure"] {
        assert!(
            latest.contains(topic),
            "readings latest lacks {topic}:\n{latest}"
        );
    }

    // As deployed: the documented ports only, no anonymous or wrong login, nobody root.
    let ports = published(&stack);
    for port in &ports {
        assert!(
            [
                "0.0.0.0:1883->1883/tcp",
                "0.0.0.0:8883->8883/tcp",
                "127.0.0.1:27017->27017/tcp",
                "127.0.0.1:1880->1880/tcp",
                "127.0.0.1:9090->9090/tcp",
                // The engine publishes on IPv6 too where the host has it.
                ":::1883->1883/tcp",
                ":::8883->8883/tcp",
            ]
            .contains(&port.as_str()),
            "{port} is published: {ports:?}"
        );
    }
    let ca = stack.root.join("ca.crt");
    let output = stack.compose(&["exec", "-T", "mosquitto-cloud", "cat", "/certs/ca.crt"]);
    std::fs::write(&ca, &output.stdout).expect("ca.crt");
    let ca = ca.display().to_string();
    let tls = ["--cafile", ca.as_str(), "--insecure"];
    let password = stack.env("TEMPERATURE_SENSOR_PASSWORD");
    for (port, extra) in [(1883, &[][..]), (8883, &tls[..])] {
        let (ok, why) = publish_on_host(port, extra);
        assert!(!ok, "anonymous publish accepted on {port}");
        assert!(
            why.contains("not authorised") || why.contains("authoris"),
            "{port}: {why}"
        );
        let wrong = [extra, &["-u", "temperature-sensor", "-P", "wrong-password"]].concat();
        let (ok, why) = publish_on_host(port, &wrong);
        assert!(!ok, "a wrong password accepted on {port}: {why}");
    }
    // The right one is (so the refusals above are the broker's, not a closed port).
    let (ok, why) = publish_on_host(1883, &["-u", "temperature-sensor", "-P", &password]);
    assert!(ok, "the sensor's own password refused on 1883: {why}");
    // Each service's main process (healthchecks run as the image's user, briefly, and
    // a broker's entrypoint renders its files as root before Mosquitto drops to its own
    // user: what runs is PID 1).
    for (service, _) in stack.states() {
        if service == "certs" {
            continue;
        }
        let pid = stack.pid(&service);
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_else(|e| panic!("{service}: /proc/{pid}/status: {e}"));
        let uids = status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .unwrap_or_else(|| panic!("{service}: no Uid in /proc/{pid}/status"));
        assert!(
            uids.split_whitespace().all(|uid| uid != "0"),
            "{service} runs as root (uids {uids})"
        );
    }

    // The dashboard profile: both sensors on the page, in a real browser.
    let mut browser = Browser::launch();
    browser.open("http://127.0.0.1:1880/dashboard").await;
    browser
        .wait_for_text(".nrdb-ui-gauge:has-text('Temperature')", "°C")
        .await;
    browser
        .wait_for_text(".nrdb-ui-gauge:has-text('Pressure')", "hPa")
        .await;
    drop(browser);

    // The monitoring profile: every target up, the rules loaded, and the API the compose
    // file points at answers.
    let prometheus = |path: &str| -> serde_json::Value {
        let output = Command::new("curl")
            .args([
                "-fsS",
                "--max-time",
                "10",
                &format!("http://127.0.0.1:9090{path}"),
            ])
            .output()
            .expect("curl");
        serde_json::from_slice(&output.stdout).unwrap_or(serde_json::Value::Null)
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let targets = prometheus("/api/v1/targets");
        let active = targets["data"]["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let down: Vec<String> = active
            .iter()
            .filter(|t| t["health"] != "up")
            .map(|t| format!("{} {}", t["scrapeUrl"], t["lastError"]))
            .collect();
        if active.len() == 8 && down.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus targets not all up: {} of 8 active, down: {down:?}",
            active.len()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let rules = prometheus("/api/v1/rules");
    let groups = rules["data"]["groups"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(!groups.is_empty(), "no rules loaded: {rules}");
    assert_eq!(prometheus("/api/v1/alerts")["status"], "success");

    // A JSON QoS 1 stream through a recreated persister, a restarted cloud broker and a
    // SIGKILLed relay.
    let before = count(&db).await;
    stack.compose_ok(&["up", "-d", "--force-recreate", "mongo-persister"]);
    stack.wait_healthy(&HEALTHY, Duration::from_secs(120));
    let before = stored_more_than(&db, before, Duration::from_secs(60)).await;
    stack.compose_ok(&["restart", "mosquitto-cloud"]);
    stack.wait_healthy(&HEALTHY, Duration::from_secs(120));
    let before = stored_more_than(&db, before, Duration::from_secs(60)).await;
    stack.compose_ok(&["kill", "-s", "SIGKILL", "edge-relay"]);
    stack.compose_ok(&["up", "-d", "--no-deps", "edge-relay"]);
    stack.wait_healthy(&HEALTHY, Duration::from_secs(120));
    stored_more_than(&db, before, Duration::from_secs(60)).await;
    let boots_first = stored_once(
        &stack,
        "fresh start, persister recreated, cloud broker restarted, relay SIGKILLed",
    )
    .await;
    start_sensors(&stack);

    // The edge–cloud link cut for two minutes under the stream: the backlog rises on
    // the relay's disk and drains when the link is back.
    let relay = stack.container("edge-relay");
    stack.wait_healthy(&HEALTHY, Duration::from_secs(120));
    let cloud = stack.network("cloud");
    let cut = docker("network")
        .args(["disconnect", &cloud, &relay])
        .status()
        .expect("docker network disconnect");
    assert!(cut.success(), "cannot cut the relay from {cloud}");
    let cut_at = Instant::now();
    let mut peak = 0.0_f64;
    while cut_at.elapsed() < Duration::from_secs(120) {
        peak = peak.max(
            stack
                .metric("edge-relay", "iot_relay_backlog")
                .unwrap_or(0.0),
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let healed = docker("network")
        .args(["connect", &cloud, &relay])
        .status()
        .expect("docker network connect");
    assert!(
        healed.success(),
        "cannot connect the relay to {cloud} again"
    );
    assert!(
        peak >= 100.0,
        "the backlog rose to {peak} only during two minutes cut off"
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let drained = loop {
        let backlog = stack.metric("edge-relay", "iot_relay_backlog");
        if backlog.is_some_and(|b| b < 10.0) {
            break cut_at.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "the backlog did not drain after the link came back: {backlog:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    eprintln!("link cut 120 s: backlog peaked at {peak}, drained {drained:?} after the cut began");

    // A bad link on the relay's cloud side (BadLink).
    let pid = stack.pid("edge-relay");
    let address = docker("inspect")
        .args([
            "--format",
            &format!("{{{{(index .NetworkSettings.Networks \"{cloud}\").IPAddress}}}}"),
            &relay,
        ])
        .output()
        .expect("docker inspect");
    let address = String::from_utf8_lossy(&address.stdout).trim().to_string();
    let links = Command::new("nsenter")
        .args(["-t", &pid, "-n", "ip", "-o", "-4", "addr", "show"])
        .output()
        .expect("nsenter runs");
    let links = String::from_utf8_lossy(&links.stdout);
    let interface = links
        .lines()
        .find(|line| line.contains(&format!(" {address}/")))
        .and_then(|line| line.split_whitespace().nth(1))
        .unwrap_or_else(|| panic!("no interface with {address} in:\n{links}"))
        .to_string();
    let link = BadLink::apply(&pid, &interface);
    let before = count(&db).await;
    let bad_since = Instant::now();
    let mut stored = before;
    while bad_since.elapsed() < Duration::from_secs(45) {
        tokio::time::sleep(Duration::from_secs(5)).await;
        stored = count(&db).await;
    }
    link.remove();
    assert!(
        stored > before + 40,
        "readings stalled over a bad link: {before} → {stored} in 45 s"
    );
    let boots_cut = stored_once(&stack, "link cut two minutes, then a bad link").await;
    assert!(boots_cut.len() > boots_first.len());

    // down, then up: the readings, the brokers' sessions and the accounts are kept. A
    // device account added as the docs say (scripts/add-device --compose) included.
    let added = Command::new("scripts/add-device")
        .args(["tier-plug", "--compose"])
        .env("COMPOSE_PROJECT_NAME", &stack.project)
        .current_dir(&stack.root)
        .output()
        .expect("scripts/add-device runs");
    let said = String::from_utf8_lossy(&added.stdout).into_owned();
    assert!(
        added.status.success(),
        "add-device: {said}{}",
        String::from_utf8_lossy(&added.stderr)
    );
    let device_password = said
        .lines()
        .find_map(|line| line.strip_prefix("password: "))
        .unwrap_or_else(|| panic!("add-device printed no password: {said}"))
        .trim()
        .to_string();
    let device = ["-u", "tier-plug", "-P", device_password.as_str()];
    let plug_topic = "/sensor/tier-plug/temperature";
    let (ok, why) = publish_to_host(1883, plug_topic, &device);
    assert!(ok, "the new device account cannot log in: {why}");
    let kept = count(&db).await;
    stack.compose_ok(&["down", "--timeout", "20"]);
    stack.up(&healthy);
    let db = stack.database().await;
    assert!(count(&db).await >= kept, "readings lost by down and up");
    stored_more_than(&db, kept, Duration::from_secs(60)).await;
    let relay_log =
        String::from_utf8_lossy(&stack.compose(&["logs", "--no-color", "edge-relay"]).stdout)
            .into_owned();
    assert!(
        !relay_log.contains("without this relay's session"),
        "the cloud broker lost the relay's session across down and up:\n{relay_log}"
    );
    let (ok, why) = publish_to_host(1883, plug_topic, &device);
    assert!(ok, "the device account is gone after down and up: {why}");
    stored_once(&stack, "down, then up").await;

    // down -v: a clean start, and again readings from seq 1.
    stack.compose_ok(&["down", "-v", "--timeout", "20"]);
    let took = stack.up(&healthy);
    eprintln!("after down -v: every service healthy {took:?} after `up --build -d`");
    let db = stack.database().await;
    let (ok, _) = publish_to_host(1883, plug_topic, &device);
    assert!(!ok, "the device account outlived down -v");
    let boots_again = stored_once(&stack, "down -v, then up").await;
    for boot in &boots_again {
        assert!(
            !boots_cut.iter().any(|old| old.boot == boot.boot),
            "a reading of before down -v is still stored: {boot:?}"
        );
    }
    drop(db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_tier_the_bridge_and_the_replicas_store_every_reading_once() {
    let Some(_tier) = tier().await else { return };

    // Mosquitto's bridge in place of the relay.
    let bridge = Stack::fresh(
        "iot-tier-bridge",
        &["compose.yaml", "compose.bridge.yaml"],
        &[],
    );
    let took = bridge.up(&HEALTHY);
    eprintln!("compose.bridge.yaml: every service healthy {took:?} after `up --build -d`");
    let db = bridge.database().await;
    stored_more_than(&db, 20, Duration::from_secs(90)).await;
    stored_once(&bridge, "compose.bridge.yaml").await;
    drop(bridge);

    // Two persister replicas; the second retired as the docs say, what waited for it
    // stored.
    let replicas = Stack::fresh(
        "iot-tier-replicas",
        &["compose.yaml", "compose.replicas.yaml"],
        &[],
    );
    let mut healthy = HEALTHY.to_vec();
    healthy.push("mongo-persister-2");
    let took = replicas.up(&healthy);
    eprintln!("compose.replicas.yaml: every service healthy {took:?} after `up --build -d`");
    let db = replicas.database().await;
    let before = stored_more_than(&db, 20, Duration::from_secs(90)).await;
    replicas.compose_ok(&["stop", "mongo-persister-2"]);
    // The broker routes a share of the stream to the stopped replica's session.
    tokio::time::sleep(Duration::from_secs(10)).await;
    stored_more_than(&db, before, Duration::from_secs(60)).await;
    let mut stop = vec!["stop"];
    stop.extend(SENSORS);
    replicas.compose_ok(&stop);
    let retired = replicas.compose_ok(&[
        "run",
        "--rm",
        "-T",
        "mongo-persister-2",
        "mongo-persister",
        "--retire",
    ]);
    eprintln!("retired: {retired}");
    let stored: u64 = retired
        .split("stored ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("--retire said: {retired}"));
    assert!(
        stored > 0,
        "nothing waited for the stopped replica: {retired}"
    );
    stored_once(
        &replicas,
        "compose.replicas.yaml, the second replica retired",
    )
    .await;
}

/// `compose.cluster.yaml`: the cloud on three NATS nodes, as the file's header says to
/// run it. Every service healthy (no cloud Mosquitto), readings stored; one node
/// SIGKILLed mid-stream: readings go on being stored, and once the sensors stop every
/// boot is whole (each reading once, from seq 1, none missing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_tier_the_cluster_file_stores_every_reading_once_through_a_nodes_loss() {
    let Some(_tier) = tier().await else { return };
    let stack = Stack::fresh(
        "iot-tier-cluster",
        &["compose.yaml", "compose.cluster.yaml"],
        &[],
    );
    let healthy: Vec<&str> = HEALTHY
        .iter()
        .copied()
        .filter(|service| *service != "mosquitto-cloud")
        .collect();
    let took = stack.up(&healthy);
    eprintln!("compose.cluster.yaml: every service healthy {took:?} after `up --build -d`");
    let states = stack.states();
    assert!(
        !states.contains_key("mosquitto-cloud"),
        "the cloud Mosquitto runs beside the cluster: {states:?}"
    );
    for node in ["nats-1", "nats-2", "nats-3"] {
        assert_eq!(
            states.get(node).map(String::as_str),
            Some("running"),
            "{states:?}"
        );
    }
    let db = stack.database().await;
    let before = stored_more_than(&db, 20, Duration::from_secs(90)).await;
    stack.compose_ok(&["kill", "-s", "SIGKILL", "nats-2"]);
    stored_more_than(&db, before + 20, Duration::from_secs(90)).await;

    // What is stored, as the other stacks check it (`readings gaps` is theirs).
    let boots = whole_boots(&stack, "compose.cluster.yaml, node 2 killed").await;
    eprintln!("compose.cluster.yaml, node 2 killed: stored once, from seq 1: {boots:?}");
}

#[tokio::test]
async fn docker_tier_a_broker_refuses_the_published_example_passwords() {
    let Some(_tier) = tier().await else { return };
    let stack = Stack::fresh("iot-tier-example-env", &["compose.yaml"], &[]);
    std::fs::copy(stack.root.join(".env.example"), stack.root.join(".env")).expect(".env");
    for broker in ["mosquitto-local", "mosquitto-cloud"] {
        let output = stack.compose(&["run", "--rm", "--no-deps", "-T", broker]);
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(
            output.status.code(),
            Some(2),
            "{broker} with .env.example: {said}"
        );
        assert!(
            said.contains("published example password") && said.contains("scripts/new-env"),
            "{broker}: {said}"
        );
    }
}
