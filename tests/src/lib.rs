//! Test harness for the end-to-end tests: every test gets its own pair of real
//! Mosquitto brokers, configured from the project's `mosquitto/` folder by
//! `mosquitto/setup.sh` on free ports with the bridge between them, and drives the
//! real binaries of the workspace as child processes.
//!
//! Everything that waits, waits for a condition with a deadline ([`WAIT`]), never for
//! a fixed time.

pub mod dashboard;
pub mod docs;
pub mod nats;
pub mod prometheus;
pub mod proxy;
pub mod sparkplug;

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, Notify};

/// The longest any single condition is waited for before the test fails.
pub const WAIT: Duration = Duration::from_secs(20);

/// The password of each broker user in the tests (the brokers never allow anonymous clients).
pub fn password(user: &str) -> String {
    format!("{user}-test-secret")
}

/// Environment variable of a user's password, as in `.env`: `temperature-sensor` ->
/// `TEMPERATURE_SENSOR_PASSWORD`.
fn password_variable(user: &str) -> String {
    format!("{}_PASSWORD", user.to_uppercase().replace('-', "_"))
}

const USERS: [&str; 8] = [
    "temperature-sensor",
    "pressure-sensor",
    "device-status",
    "mqtt-subscriber",
    "bridge",
    "edge-relay",
    "mongo-persister",
    "dashboard",
];

/// The repository's top folder.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the repository")
        .to_path_buf()
}

/// The resident memory of process `pid`, from `/proc` (`None` once it is gone).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())?;
    Some(kib * 1024)
}

/// A free TCP port on the loopback interface, as the OS hands it out.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("no free port on 127.0.0.1")
}

/// A free port on 127.0.0.1 below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`), for a server that is killed and started again on
/// the same port: a port another test binds to 0 ([`free_port`]), or a connection's own
/// end, is never taken from there, so it is still free when the server comes back.
pub fn free_port_to_keep() -> u16 {
    use std::hash::BuildHasher;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (from, to) = (10_000_u16, ephemeral);
    if to <= from + 1000 {
        return free_port();
    }
    for _ in 0..1000 {
        let random = std::collections::hash_map::RandomState::new().hash_one(0_u8);
        let port = from + u16::try_from(random % u64::from(to - from)).expect("a port");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    free_port()
}

/// Copies the working tree's files (tracked, and new ones not ignored) to `to`, as a
/// fresh clone of this state would have them.
pub fn copy_checkout(to: &std::path::Path) {
    let listed = std::process::Command::new("git")
        .args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ])
        .current_dir(repo_root())
        .output()
        .expect("git ls-files");
    assert!(listed.status.success(), "git ls-files failed");
    for file in listed
        .stdout
        .split(|byte| *byte == 0)
        .filter(|f| !f.is_empty())
    {
        let file = std::path::Path::new(std::str::from_utf8(file).expect("UTF-8 path"));
        let from = repo_root().join(file);
        if !from.is_file() {
            continue; // deleted in the working tree
        }
        let target = to.join(file);
        std::fs::create_dir_all(target.parent().expect("a parent")).expect("mkdir");
        std::fs::copy(&from, &target).expect("copy");
    }
}

/// Waits until `condition` holds, polling every 20 ms; panics with `what` after [`WAIT`].
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One real Mosquitto process with its rendered configuration folder.
#[derive(Debug)]
pub struct Broker {
    pub name: &'static str,
    pub port: u16,
    /// The TLS listener's port (the cloud broker's, for the bridge).
    pub tls_port: Option<u16>,
    conf_dir: PathBuf,
    process: Option<Child>,
    log: Output,
}

impl Broker {
    /// Renders the configuration with `mosquitto/setup.sh` and starts the broker,
    /// trying other ports if the chosen one was taken meanwhile.
    async fn spawn(name: &'static str, root: &Path, extra_env: &[(&str, String)]) -> Broker {
        let mut last_log = String::new();
        for _ in 0..5 {
            let port = free_port();
            // The cloud broker has a TLS listener for the bridge too.
            let tls_port = (name == "cloud").then(free_port);
            let conf_dir = root.join(name);
            let mut setup = std::process::Command::new(repo_root().join("mosquitto/setup.sh"));
            setup
                .arg(name)
                .arg(&conf_dir)
                .env("MQTT_LISTEN_PORT", port.to_string())
                .env("MQTT_LISTEN_ADDRESS", "127.0.0.1");
            if let Some(tls_port) = tls_port {
                setup.env("MQTT_TLS_PORT", tls_port.to_string());
            }
            for user in USERS {
                setup.env(password_variable(user), password(user));
            }
            for (key, value) in extra_env {
                setup.env(key, value);
            }
            let status = setup.status().expect("cannot run mosquitto/setup.sh");
            assert!(
                status.success(),
                "mosquitto/setup.sh {name} failed: {status}"
            );
            let mut broker = Broker {
                name,
                port,
                tls_port,
                conf_dir,
                process: None,
                log: Output::default(),
            };
            if broker.start().await {
                return broker;
            }
            last_log = broker.log.text();
        }
        panic!("the {name} broker did not start:\n{last_log}");
    }

    /// Starts (or restarts) the broker on its port; false if it exited instead.
    pub async fn start(&mut self) -> bool {
        assert!(
            self.process.is_none(),
            "{} broker already running",
            self.name
        );
        let mut command = Command::new("mosquitto");
        command.arg("-c").arg(self.conf_dir.join("mosquitto.conf"));
        self.process = start_server(command, self.port, &self.log).await;
        self.process.is_some()
    }

    /// The broker's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(Child::id)
    }

    /// The broker's configuration folder, as `mosquitto/setup.sh` made it.
    pub fn conf_dir(&self) -> &Path {
        &self.conf_dir
    }

    /// Gives a device an account on this broker with `scripts/add-device` (the broker
    /// keeps running); returns the password it printed.
    pub fn add_device(&self, name: &str, preset: &str) -> String {
        self.add_device_with(name, preset, &[])
    }

    /// As [`Broker::add_device`], with more of `add-device`'s options (`--max-message`).
    pub fn add_device_with(&self, name: &str, preset: &str, options: &[&str]) -> String {
        let mut args = vec![name, "--preset", preset];
        args.extend_from_slice(options);
        let output = self.device_script("add-device", &args);
        let stdout = String::from_utf8_lossy(&output.stdout);
        stdout
            .lines()
            .find_map(|line| line.strip_prefix("password: "))
            .unwrap_or_else(|| panic!("add-device printed no password:\n{stdout}"))
            .trim()
            .to_string()
    }

    /// Logs in as a device whose account [`Broker::add_device`] made, retrying while
    /// the broker has not read it yet (it does on the SIGHUP the script sends).
    pub async fn log_in(&self, name: &str, password: &str) -> TestClient {
        wait_for(
            &format!("{name}'s new account to log in"),
            || TestClient::try_connect_as(self.port, name, password),
            Result::is_ok,
        )
        .await
        .expect("logged in")
    }

    /// Takes a device's account away with `scripts/remove-device`.
    pub fn remove_device(&self, name: &str) {
        self.device_script("remove-device", &[name]);
    }

    fn device_script(&self, script: &str, args: &[&str]) -> std::process::Output {
        let output = std::process::Command::new(repo_root().join("scripts").join(script))
            .args(args)
            .arg("--conf-dir")
            .arg(&self.conf_dir)
            .env("BROKER_ADDRESS", format!("127.0.0.1:{}", self.port))
            .output()
            .unwrap_or_else(|error| panic!("cannot run scripts/{script}: {error}"));
        assert!(
            output.status.success(),
            "scripts/{script} {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    /// Stops the broker abruptly (SIGKILL), as a crash or power loss would.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.process.take() {
            child.kill().await.expect("cannot kill mosquitto");
        }
    }

    /// Kills the broker (SIGKILL) and removes its persistence file, as a machine that
    /// lost power before the broker's first save leaves it: it comes back without
    /// sessions, subscriptions, queued or retained messages.
    pub async fn kill_losing_state(&mut self) {
        self.kill().await;
        let file = self.conf_dir.join("data/mosquitto.db");
        match std::fs::remove_file(&file) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => panic!("cannot remove {}: {error}", file.display()),
        }
    }

    /// Makes the broker write its persistence now (SIGUSR1), as its periodic autosave
    /// does, and waits until the file is in place. Mosquitto logs "Saving in-memory
    /// database" before it writes, to `mosquitto.db.new`, and renames that over
    /// `mosquitto.db` when done: a new file under the name is the end of the save.
    pub async fn save(&self) {
        use std::os::unix::fs::MetadataExt;
        let child = self.process.as_ref().expect("broker running");
        let file = self.conf_dir.join("data/mosquitto.db");
        let before = std::fs::metadata(&file).map(|meta| meta.ino()).ok();
        signal(child, "USR1");
        let deadline = tokio::time::Instant::now() + WAIT;
        while std::fs::metadata(&file).map(|meta| meta.ino()).ok() == before {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the {} broker did not save {} on SIGUSR1:\n{}",
                self.name,
                file.display(),
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the broker cleanly (SIGTERM): it saves its persistence first.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.process.take() {
            signal(&child, "TERM");
            tokio::time::timeout(WAIT, child.wait())
                .await
                .expect("mosquitto did not stop on SIGTERM")
                .expect("cannot wait for mosquitto");
        }
    }

    /// What the broker logged so far.
    pub fn log(&self) -> String {
        self.log.text()
    }

    /// Waits until a line of the broker's log contains `needle`.
    pub async fn wait_for_log(&self, needle: &str) {
        self.log
            .wait_for(needle, 1, &format!("the {} broker", self.name))
            .await;
    }
}

/// Starts a server process and waits until it accepts connections on `port`; None if it
/// exited (a port taken meanwhile, say) or did not listen within [`WAIT`]. Its output is
/// read into `log` for as long as it runs.
async fn start_server(mut command: Command, port: u16, log: &Output) -> Option<Child> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let program = command
        .as_std()
        .get_program()
        .to_string_lossy()
        .into_owned();
    let mut child = command.spawn().unwrap_or_else(|error| {
        panic!("cannot start {program}: {error} (scripts/test installs what the tests need)")
    });
    let _ = log.capture(child.stdout.take());
    let _ = log.capture(child.stderr.take());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Some(child);
        }
        if child.try_wait().ok().flatten().is_some() || tokio::time::Instant::now() > deadline {
            let _ = child.kill().await;
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The edge and cloud brokers of one test, bridged, in a folder of their own.
#[derive(Debug)]
pub struct Brokers {
    pub local: Broker,
    pub cloud: Broker,
    dir: TempDir,
}

/// `args` and `--metrics-address` on a free port of 127.0.0.1; the port.
pub fn with_metrics_address(args: &[&str]) -> (Vec<String>, u16) {
    let port = free_port();
    let args = args
        .iter()
        .map(|arg| (*arg).to_string())
        .chain(["--metrics-address".into(), format!("127.0.0.1:{port}")])
        .collect();
    (args, port)
}

impl Brokers {
    /// A folder for the test's own files (working directory of the binaries).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts binary `name` against the edge broker, logged in as its own user (every
    /// edge binary has a broker user of the same name).
    pub fn start_edge(&self, name: &str, args: &[&str]) -> Service {
        spawn_service(name, self.dir(), self.local.port, Some(name), args)
    }

    /// Starts `mongo-persister` against the cloud broker and the test's database.
    pub fn start_persister(&self, mongo: &MongoServer, args: &[&str]) -> Service {
        let env = [
            ("MONGODB_URI", mongo.uri().to_string()),
            ("MONGODB_DATABASE", mongo.database_name().to_string()),
        ];
        spawn_service_with_env(
            "mongo-persister",
            self.dir(),
            self.cloud.port,
            Some("mongo-persister"),
            args,
            &env,
        )
    }

    /// Starts `edge-relay` between the two brokers, logged in as `edge-relay` on both,
    /// with its log in `log_dir` and `args` added (`--site`, `--max-disk`, ...).
    pub fn start_relay(&self, log_dir: &Path, args: &[&str]) -> Service {
        self.start_relay_at(&self.local, log_dir, args)
    }

    /// As [`Brokers::start_relay`], from edge broker `edge` (another site's,
    /// [`Brokers::spawn_relay_site`]).
    pub fn start_relay_at(&self, edge: &Broker, log_dir: &Path, args: &[&str]) -> Service {
        self.start_relay_as(edge, "edge-relay", log_dir, args)
    }

    /// As [`Brokers::start_relay_at`], logged in to the cloud broker as `cloud_user`
    /// (a site's own account: `edge-relay-SITE` of [`SITES`]).
    pub fn start_relay_as(
        &self,
        edge: &Broker,
        cloud_user: &str,
        log_dir: &Path,
        args: &[&str],
    ) -> Service {
        let user = "edge-relay";
        let env = [
            ("CLOUD_BROKER", "127.0.0.1".to_string()),
            ("CLOUD_PORT", self.cloud.port.to_string()),
            ("CLOUD_USERNAME", cloud_user.to_string()),
            ("CLOUD_PASSWORD", password(cloud_user)),
            ("RELAY_LOG_DIR", log_dir.display().to_string()),
            // The edge broker's accounts, as the native stack and compose give them.
            (
                "RELAY_ACCOUNTS",
                edge.conf_dir().join("acl").display().to_string(),
            ),
        ];
        spawn_service_with_env("edge-relay", self.dir(), edge.port, Some(user), args, &env)
    }

    /// As [`Brokers::start_relay`], and waits until the relay subscribed on both brokers.
    pub async fn relay_ready(&self, log_dir: &Path, args: &[&str]) -> Service {
        self.relay_ready_as(&self.local, "edge-relay", log_dir, args)
            .await
    }

    /// [`Brokers::relay_ready`] with the relay's metrics on a free port: the relay and
    /// the port.
    pub async fn relay_with_metrics(&self, log_dir: &Path, args: &[&str]) -> (Service, u16) {
        let (relay, port) = self.start_relay_with_metrics(log_dir, args).await;
        relay.wait_for_log("subscribed on the edge broker").await;
        relay.wait_for_log("subscribed on the cloud broker").await;
        (relay, port)
    }

    /// [`Brokers::start_relay`] with the relay's metrics on a free port, once it listens
    /// there (its first step): a port another test took between the probe and the
    /// relay's bind ("Address already in use") is tried again with another.
    pub async fn start_relay_with_metrics(&self, log_dir: &Path, args: &[&str]) -> (Service, u16) {
        const BIND_FAILED: &str = "cannot listen for metrics";
        for _ in 0..5 {
            let (with, port) = with_metrics_address(args);
            let with: Vec<&str> = with.iter().map(String::as_str).collect();
            let mut relay = self.start_relay(log_dir, &with);
            let said = wait_for(
                "the relay to listen for metrics, or fail to",
                || async {
                    let text = relay.stderr();
                    (
                        text.contains("edge-relay starting"),
                        text.contains(BIND_FAILED),
                    )
                },
                |(started, failed)| *started || *failed,
            )
            .await;
            if said.0 {
                return (relay, port);
            }
            relay.wait_exit().await;
        }
        panic!("the relay found no free port for its metrics in 5 tries");
    }

    /// As [`Brokers::start_relay_as`], and waits until the relay subscribed on both.
    pub async fn relay_ready_as(
        &self,
        edge: &Broker,
        cloud_user: &str,
        log_dir: &Path,
        args: &[&str],
    ) -> Service {
        let relay = self.start_relay_as(edge, cloud_user, log_dir, args);
        relay.wait_for_log("subscribed on the edge broker").await;
        relay.wait_for_log("subscribed on the cloud broker").await;
        relay
    }

    /// The edge broker of another site, set up for `edge-relay` into the same cloud
    /// broker, in a folder of its own (`<dir>/<site>/local`).
    pub async fn spawn_relay_site(&self, site: &str) -> Broker {
        let root = self.dir().join(site);
        std::fs::create_dir_all(&root).expect("the site's folder");
        set_mode(&root, 0o755);
        Broker::spawn("local", &root, &[("EDGE_FORWARDER", "relay".to_string())]).await
    }

    /// Starts `mongo-persister` with a new session and waits until both its
    /// subscriptions stand.
    pub async fn persister_ready(&self, mongo: &MongoServer, args: &[&str]) -> Service {
        let persister = self.start_persister(mongo, args);
        persister.wait_for_logs("subscribed", 2).await;
        persister
    }
}

/// Starts a cloud broker, then an edge broker bridged to it over TLS (Mosquitto's
/// bridge, `EDGE_FORWARDER=bridge`), and waits until the bridge is connected.
pub async fn spawn_brokers() -> Brokers {
    let brokers = start_brokers(&[]).await;
    brokers.wait_for_bridge().await;
    brokers
}

/// Starts a cloud broker, then an edge broker bridged to it with `local_env` added to
/// its set-up, without waiting for the bridge. `EDGE_FORWARDER=relay` in `local_env`
/// makes the edge broker one for `edge-relay` instead ([`Brokers::start_relay`]).
pub async fn start_brokers(local_env: &[(&str, String)]) -> Brokers {
    let dir = tempfile::Builder::new()
        .prefix("iot-e2e-")
        .tempdir()
        .expect("cannot create a temporary folder");
    // Mosquitto started as root drops to the `mosquitto` user, who must reach the files.
    set_mode(dir.path(), 0o755);
    let cloud = Broker::spawn("cloud", dir.path(), &[("EDGE_SITES", edge_sites())]).await;
    let bridge_port = cloud.tls_port.expect("the cloud broker's TLS port");
    let mut env = vec![
        ("CLOUD_BRIDGE_HOST", "127.0.0.1".to_string()),
        ("CLOUD_BRIDGE_PORT", bridge_port.to_string()),
        ("EDGE_FORWARDER", "bridge".to_string()),
    ];
    env.extend(local_env.iter().cloned());
    let local = Broker::spawn("local", dir.path(), &env).await;
    Brokers { local, cloud, dir }
}

/// Edge sites with cloud accounts of their own on every test's cloud broker
/// (`EDGE_SITES`): `edge-relay-SITE`, with [`password`] of that name.
pub const SITES: [&str; 2] = ["plant-2", "plant-3"];

fn edge_sites() -> String {
    SITES
        .iter()
        .map(|site| format!("{site}:{}", password(&format!("edge-relay-{site}"))))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A cloud broker and an edge broker set up for `edge-relay` (no bridge); start the
/// relay with [`Brokers::relay_ready`].
pub async fn spawn_relay_brokers() -> Brokers {
    start_brokers(&[("EDGE_FORWARDER", "relay".to_string())]).await
}

/// Makes a development CA and server certificate in `dir` with `mosquitto/certs.sh`.
pub fn make_certificates(dir: &Path) {
    let status = std::process::Command::new(repo_root().join("mosquitto/certs.sh"))
        .arg(dir)
        .status()
        .expect("cannot run mosquitto/certs.sh");
    assert!(status.success(), "mosquitto/certs.sh failed: {status}");
    set_mode(dir, 0o755);
}

impl Brokers {
    /// Waits until the edge broker reports both connections of its bridge to the cloud
    /// connected (readings out, replay requests in).
    pub async fn wait_for_bridge(&self) {
        let mut watcher = TestClient::connect(self.local.port, "mqtt-subscriber").await;
        watcher.subscribe("$SYS/broker/connection/+/state").await;
        let mut up = std::collections::BTreeSet::new();
        while up.len() < 2 {
            let message = watcher.next_message().await;
            if message.payload.as_ref() == b"1" {
                up.insert(message.topic);
            } else {
                up.remove(&message.topic);
            }
        }
    }
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Sends a signal by name (`TERM`, `KILL`, `INT`) to a child process.
fn signal(child: &Child, name: &str) {
    let Some(pid) = child.id() else { return };
    let status = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("cannot run kill");
    assert!(status.success(), "kill -{name} {pid} failed");
}

/// Lines a process wrote, collected as they come.
#[derive(Debug, Clone, Default)]
struct Output {
    lines: Arc<Mutex<Vec<String>>>,
    changed: Arc<Notify>,
}

impl Output {
    /// Reads `stream` line by line until it ends; the task ends with it.
    fn capture(
        &self,
        stream: Option<impl AsyncRead + Unpin + Send + 'static>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let output = self.clone();
        let stream = stream?;
        Some(tokio::spawn(async move {
            let mut lines = BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                output.lines.lock().expect("output lock").push(line);
                output.changed.notify_waiters();
            }
        }))
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("output lock").clone()
    }

    /// Waits until `times` lines contain `needle`; panics naming `who` after [`WAIT`].
    async fn wait_for(&self, needle: &str, times: usize, who: &str) {
        self.wait_for_within(WAIT, needle, times, who).await;
    }

    /// As [`Output::wait_for`], for up to `within`.
    async fn wait_for_within(&self, within: Duration, needle: &str, times: usize, who: &str) {
        let found = tokio::time::timeout(within, async {
            loop {
                let changed = self.changed.notified();
                let seen = self
                    .lines()
                    .iter()
                    .filter(|line| line.contains(needle))
                    .count();
                if seen >= times {
                    return;
                }
                // Re-check at least every 100 ms in case a notification slipped by.
                let _ = tokio::time::timeout(Duration::from_millis(100), changed).await;
            }
        })
        .await;
        assert!(
            found.is_ok(),
            "{who} did not log {needle:?} {times} time(s); it logged:\n{}",
            self.text()
        );
    }

    fn text(&self) -> String {
        self.lines().join("\n")
    }
}

/// Cargo's per-package variables of this test process: a nested `cargo build` that sees
/// them thinks its inputs changed and rebuilds everything, so remove them from its
/// environment.
pub fn cargo_package_variables() -> Vec<String> {
    let prefixes = [
        "CARGO_PKG_",
        "CARGO_MANIFEST_",
        "CARGO_CRATE_",
        "CARGO_BIN_",
        "CARGO_PRIMARY_",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_",
    ];
    std::env::vars()
        .map(|(key, _)| key)
        .filter(|key| prefixes.iter().any(|prefix| key.starts_with(prefix)))
        .collect()
}

/// The path of a workspace binary. Builds the binaries once per test process, so the
/// tests run the code as it is now.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        // target/<profile>/deps/<test binary> -> target/<profile>
        let exe = std::env::current_exe().expect("current_exe");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary inside target/<profile>/deps")
            .to_path_buf();
        let mut build =
            std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        build
            .args(["build", "--workspace", "--bins"])
            .current_dir(repo_root());
        if profile_dir
            .file_name()
            .is_some_and(|name| name == "release")
        {
            build.arg("--release");
        }
        for key in cargo_package_variables() {
            build.env_remove(key);
        }
        let status = build.status().expect("cannot run cargo build");
        assert!(status.success(), "cargo build --workspace --bins failed");
        profile_dir
    });
    dir.join(name)
}

/// A running binary of the workspace.
#[derive(Debug)]
pub struct Service {
    pub name: String,
    child: Option<Child>,
    stdout: Output,
    stderr: Output,
    /// The tasks reading stdout and stderr: done once the process closed them.
    readers: Vec<tokio::task::JoinHandle<()>>,
    status: Option<ExitStatus>,
}

/// Starts binary `name` with `args`, logged in to `port` as `user` (None: no
/// credentials), in `dir` with a clean environment (no `.env`, no stray settings).
pub fn spawn_service(
    name: &str,
    dir: &Path,
    port: u16,
    user: Option<&str>,
    args: &[&str],
) -> Service {
    spawn_service_with_env(name, dir, port, user, args, &[])
}

/// As [`spawn_service`], with more environment variables. For the cloud-side
/// `mongo-persister`, `port` and `user` become `CLOUD_PORT` and `CLOUD_USERNAME`.
pub fn spawn_service_with_env(
    name: &str,
    dir: &Path,
    port: u16,
    user: Option<&str>,
    args: &[&str],
    env: &[(&str, String)],
) -> Service {
    Service::spawn(name, service_command(name, dir, port, user, args, env))
}

/// The command [`spawn_service_with_env`] runs.
pub fn service_command(
    name: &str,
    dir: &Path,
    port: u16,
    user: Option<&str>,
    args: &[&str],
    env: &[(&str, String)],
) -> Command {
    let side = if name == "mongo-persister" {
        "CLOUD"
    } else {
        "LOCAL"
    };
    let mut command = Command::new(binary(name));
    command
        .args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .env(format!("{side}_BROKER"), "127.0.0.1")
        .env(format!("{side}_PORT"), port.to_string());
    if let Some(user) = user {
        command
            .env(format!("{side}_USERNAME"), user)
            .env(format!("{side}_PASSWORD"), password(user));
    }
    command.envs(env.iter().map(|(key, value)| (key, value)));
    command
}

impl Service {
    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Starts `command` with its output captured; `name` names it in failures.
    pub fn spawn(name: &str, command: Command) -> Service {
        Self::start(name, command, true).0
    }

    /// As [`Service::spawn`], but stdout is the caller's to read (or not: a reader that
    /// stalls, like `| less` left open).
    pub fn spawn_holding_stdout(
        name: &str,
        command: Command,
    ) -> (Service, tokio::process::ChildStdout) {
        match Self::start(name, command, false) {
            (service, Some(stdout)) => (service, stdout),
            (_, None) => panic!("no stdout pipe for {name}"),
        }
    }

    fn start(
        name: &str,
        mut command: Command,
        capture_stdout: bool,
    ) -> (Service, Option<tokio::process::ChildStdout>) {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {name}: {error}"));
        let (stdout, stderr) = (Output::default(), Output::default());
        let held = if capture_stdout {
            None
        } else {
            child.stdout.take()
        };
        let readers = [
            stdout.capture(child.stdout.take()),
            stderr.capture(child.stderr.take()),
        ];
        let service = Service {
            name: name.to_string(),
            child: Some(child),
            stdout,
            stderr,
            readers: readers.into_iter().flatten().collect(),
            status: None,
        };
        (service, held)
    }

    /// Lines written to stdout so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lines()
    }

    /// What was logged to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.text()
    }

    /// Waits until a stderr line contains `needle`.
    pub async fn wait_for_log(&self, needle: &str) {
        self.wait_for_logs(needle, 1).await;
    }

    /// As [`Service::wait_for_log`], for up to `within`: for what a loaded machine makes
    /// slow and the test does not time (a cluster's first answers, say).
    pub async fn wait_for_log_within(&self, within: Duration, needle: &str) {
        self.stderr
            .wait_for_within(within, needle, 1, &self.name)
            .await;
    }

    /// Waits until a stdout line contains `needle`.
    pub async fn wait_for_stdout(&self, needle: &str) {
        self.stdout.wait_for(needle, 1, &self.name).await;
    }

    /// Waits until `times` stderr lines contain `needle`.
    pub async fn wait_for_logs(&self, needle: &str, times: usize) {
        self.stderr.wait_for(needle, times, &self.name).await;
    }

    /// Waits for the process to exit by itself and returns its status.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        self.wait_exit_within(WAIT).await
    }

    /// As [`Service::wait_exit`], for up to `within`: for a process that runs long by
    /// design (a stream of a minute).
    pub async fn wait_exit_within(&mut self, within: Duration) -> ExitStatus {
        if let Some(status) = self.status {
            return status;
        }
        let mut child = self.child.take().expect("process handle");
        let status = match tokio::time::timeout(within, child.wait()).await {
            Ok(status) => status.expect("cannot wait for the process"),
            Err(_) => {
                let _ = child.kill().await;
                panic!("{} did not exit; it logged:\n{}", self.name, self.stderr());
            }
        };
        // Everything it wrote is read once the readers reach the end of the pipes.
        for reader in self.readers.drain(..) {
            let _ = tokio::time::timeout(WAIT, reader).await;
        }
        self.status = Some(status);
        status
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => child.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    /// Waits for the process to exit by itself and asserts it succeeded.
    pub async fn expect_success(&mut self) {
        let status = self.wait_exit().await;
        assert!(
            status.success(),
            "{} exited with {status}:\n{}",
            self.name,
            self.stderr()
        );
    }

    /// Stops the process with SIGTERM and asserts it exited cleanly (status 0).
    pub async fn stop_cleanly(&mut self) {
        let status = self.terminate().await;
        assert!(
            status.success(),
            "{} stopped with {status}:\n{}",
            self.name,
            self.stderr()
        );
    }

    /// Sends SIGINT (Ctrl-C) and waits for the exit.
    pub async fn interrupt(&mut self) -> ExitStatus {
        signal(self.child.as_ref().expect("process handle"), "INT");
        self.wait_exit().await
    }

    /// Sends SIGTERM (what `docker stop` sends) and waits for the exit.
    pub async fn terminate(&mut self) -> ExitStatus {
        signal(self.child.as_ref().expect("process handle"), "TERM");
        self.wait_exit().await
    }

    /// Kills the process with SIGKILL: no clean-up runs.
    pub async fn kill(&mut self) {
        let mut child = self.child.take().expect("process handle");
        child.kill().await.expect("cannot kill");
    }
}

/// The MongoDB of one test, with a database of the test's own. With `MONGODB_URI`
/// set, that server (a real MongoDB); else a server the test starts itself: `mongod`
/// when it is on the PATH, else `nx-27017` (from `.venv/`, where `scripts/test`
/// installs it, or the PATH).
#[derive(Debug)]
pub struct MongoServer {
    uri: String,
    database: String,
    own: Option<OwnServer>,
}

/// A server process the test started, and can stop and start again.
#[derive(Debug)]
struct OwnServer {
    port: u16,
    program: PathBuf,
    data_dir: TempDir,
    process: Option<Child>,
    log: Output,
}

impl MongoServer {
    /// The connection string of the server.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The name of the test's database.
    pub fn database_name(&self) -> &str {
        &self.database
    }

    /// A client on the test's database, for the test's own checks.
    pub async fn database(&self) -> mongodb::Database {
        let mut options = mongodb::options::ClientOptions::parse(&self.uri)
            .await
            .expect("valid uri");
        options.server_selection_timeout = Some(WAIT);
        mongodb::Client::with_options(options)
            .expect("client")
            .database(&self.database)
    }

    /// Whether the test started the server itself (and so can stop it).
    pub fn is_own(&self) -> bool {
        self.own.is_some()
    }

    /// Starts the test's own server again on its port with its data; false if it
    /// exited instead.
    pub async fn start(&mut self) -> bool {
        let own = self
            .own
            .as_mut()
            .expect("an external MongoDB cannot be started by a test");
        assert!(own.process.is_none(), "MongoDB already running");
        let dir = own.data_dir.path();
        let mut command = Command::new(&own.program);
        if own.program.ends_with("mongod") {
            command
                .arg("--dbpath")
                .arg(dir)
                .args(["--bind_ip", "127.0.0.1", "--quiet", "--port"]);
        } else {
            command
                .arg("--data-dir")
                .arg(dir.join("data"))
                .arg("--log-file")
                .arg(dir.join("server.log"))
                .arg("--pid-file")
                .arg(dir.join("server.pid"))
                .args(["--host", "127.0.0.1", "--port"]);
        }
        command.arg(own.port.to_string());
        own.process = start_server(command, own.port, &own.log).await;
        own.process.is_some()
    }

    /// Stops the test's own server (SIGTERM, then SIGKILL if it lingers); its data stays.
    pub async fn stop(&mut self) {
        let own = self
            .own
            .as_mut()
            .expect("an external MongoDB cannot be stopped by a test");
        if let Some(mut child) = own.process.take() {
            signal(&child, "TERM");
            if tokio::time::timeout(WAIT, child.wait()).await.is_err() {
                let _ = child.kill().await;
            }
        }
    }

    /// What the test's own server printed.
    pub fn log(&self) -> String {
        self.own
            .as_ref()
            .map(|own| own.log.text())
            .unwrap_or_default()
    }
}

fn mongo_program() -> PathBuf {
    let on_path = |name: &str| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|candidate| candidate.is_file())
        })
    };
    on_path("mongod")
        .or_else(|| Some(repo_root().join(".venv/bin/nx-27017")).filter(|path| path.is_file()))
        .or_else(|| on_path("nx-27017"))
        .expect("no MongoDB-compatible server: run scripts/test (installs nx-27017 into .venv) or put mongod on the PATH")
}

/// The MongoDB of a test: `MONGODB_URI` when set, else a server of the test's own on a
/// free port. Either way the test gets a database nobody else uses.
pub async fn spawn_mongo() -> MongoServer {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let database = format!(
        "iot_test_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    if let Some(uri) = std::env::var("MONGODB_URI")
        .ok()
        .filter(|uri| !uri.is_empty())
    {
        return MongoServer {
            uri,
            database,
            own: None,
        };
    }
    let program = mongo_program();
    for _ in 0..5 {
        let port = free_port();
        let mut server = MongoServer {
            uri: format!("mongodb://127.0.0.1:{port}"),
            database: database.clone(),
            own: Some(OwnServer {
                port,
                program: program.clone(),
                data_dir: tempfile::Builder::new()
                    .prefix("iot-e2e-db-")
                    .tempdir()
                    .expect("temporary folder"),
                process: None,
                log: Output::default(),
            }),
        };
        if server.start().await {
            return server;
        }
    }
    panic!("{} did not start", program.display());
}

/// A database server of the test's own, which it may stop and start; `None` (and a
/// line saying the test is skipped) when `MONGODB_URI` names a server instead.
pub async fn spawn_stoppable_mongo() -> Option<MongoServer> {
    let mongo = spawn_mongo().await;
    if !mongo.is_own() {
        skipped("MONGODB_URI names a server this test cannot stop");
        return None;
    }
    Some(mongo)
}

/// Reports the running test as skipped: on stderr, and, when `scripts/test` set
/// `IOT_TESTS_SKIPPED`, as a line of that file, so that its closing line counts it.
pub fn skipped(why: &str) {
    let test = std::thread::current()
        .name()
        .unwrap_or("a test")
        .to_string();
    eprintln!("skipped: {test}: {why}");
    if let Some(path) = std::env::var_os("IOT_TESTS_SKIPPED") {
        use std::io::Write;
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut file| writeln!(file, "{test}: {why}"));
        if let Err(error) = written {
            panic!("cannot record the skipped test in {path:?}: {error}");
        }
    }
}

/// Runs the `readings` binary against `database` on `uri`, in an empty folder with a
/// clean environment.
pub fn run_readings(uri: &str, database: &str, args: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().expect("tempdir");
    std::process::Command::new(binary("readings"))
        .args(args)
        .env_clear()
        .env("MONGODB_URI", uri)
        .env("MONGODB_DATABASE", database)
        .current_dir(dir.path())
        .output()
        .expect("readings runs")
}

/// [`run_readings`]'s exit code, stdout and stderr.
pub fn readings_with_code(
    uri: &str,
    database: &str,
    args: &[&str],
) -> (Option<i32>, String, String) {
    let output = run_readings(uri, database, args);
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Waits until `check` returns true, asking again every 50 ms; panics with `what` and
/// the last answer after [`WAIT`].
pub async fn wait_for<T: std::fmt::Debug, F: std::future::Future<Output = T>>(
    what: &str,
    ask: impl FnMut() -> F,
    check: impl Fn(&T) -> bool,
) -> T {
    wait_for_within(WAIT, what, ask, check).await
}

/// Waits until `check` passes on the number `ask` returns, for as long as that number
/// moves: panics with `what` once it stood still for `stall` (or after `cap` in all).
/// For a count that a loaded machine makes slow but that must not stop short: what the
/// test asserts is that it gets there, not how fast.
pub async fn wait_while_it_moves<F: std::future::Future<Output = u64>>(
    what: &str,
    (stall, cap): (Duration, Duration),
    mut ask: impl FnMut() -> F,
    check: impl Fn(u64) -> bool,
) -> u64 {
    let started = tokio::time::Instant::now();
    let (mut last, mut moved) = (ask().await, started);
    loop {
        if check(last) {
            return last;
        }
        let now = tokio::time::Instant::now();
        assert!(
            now.duration_since(moved) < stall && now.duration_since(started) < cap,
            "{what}: stood at {last} for {:?} ({:?} in all)",
            now.duration_since(moved),
            now.duration_since(started)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let answer = ask().await;
        if answer != last {
            (last, moved) = (answer, tokio::time::Instant::now());
        }
    }
}

/// [`wait_for`] with a deadline of `within`.
pub async fn wait_for_within<T: std::fmt::Debug, F: std::future::Future<Output = T>>(
    within: Duration,
    what: &str,
    mut ask: impl FnMut() -> F,
    check: impl Fn(&T) -> bool,
) -> T {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let answer = ask().await;
        if check(&answer) {
            return answer;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}; last: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An independent MQTT client for the test itself: it connects once (no reconnects)
/// and hands over every packet it receives.
#[derive(Debug)]
pub struct TestClient {
    pub client: AsyncClient,
    /// Whether the broker answered the connection with a kept session.
    pub session_present: bool,
    packets: mpsc::UnboundedReceiver<Packet>,
    /// Messages that arrived while the test waited for another packet.
    early: std::collections::VecDeque<Publish>,
}

impl TestClient {
    /// Connects to `port` as `user` with a clean session; panics if refused.
    pub async fn connect(port: u16, user: &str) -> TestClient {
        Self::try_connect(
            port,
            Some(user),
            &format!("test-{user}-{}", free_port()),
            true,
        )
        .await
        .unwrap_or_else(|error| panic!("{user} could not connect: {error}"))
    }

    /// Connects with the given identity; the broker's refusal comes back as an error.
    pub async fn try_connect(
        port: u16,
        user: Option<&str>,
        client_id: &str,
        clean: bool,
    ) -> Result<TestClient, String> {
        let credentials = user.map(|user| (user.to_string(), password(user)));
        Self::try_connect_with(port, credentials, client_id, clean).await
    }

    /// Connects as `user` with `password` (a device's account), clean session.
    pub async fn try_connect_as(
        port: u16,
        user: &str,
        password: &str,
    ) -> Result<TestClient, String> {
        let credentials = Some((user.to_string(), password.to_string()));
        Self::try_connect_with(
            port,
            credentials,
            &format!("test-{user}-{}", free_port()),
            true,
        )
        .await
    }

    async fn try_connect_with(
        port: u16,
        credentials: Option<(String, String)>,
        client_id: &str,
        clean: bool,
    ) -> Result<TestClient, String> {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
        options.set_max_packet_size(
            iot_core::config::MAX_PACKET_SIZE,
            iot_core::config::MAX_PACKET_SIZE,
        );
        options.set_clean_session(clean);
        options.set_keep_alive(Duration::from_secs(30));
        if let Some((user, password)) = credentials {
            options.set_credentials(user, password);
        }
        let (client, mut eventloop) = AsyncClient::new(options, 1000);
        let (tx, mut packets) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(packet)) => {
                        if tx.send(packet).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Outgoing(_)) => {}
                    Err(error) => {
                        // Closing the channel tells the test; say why first.
                        let _ = tx.send(Packet::Disconnect);
                        eprintln!("test client: {error}");
                        return;
                    }
                }
            }
        });
        match tokio::time::timeout(WAIT, packets.recv()).await {
            Ok(Some(Packet::ConnAck(ack))) => Ok(TestClient {
                client,
                session_present: ack.session_present,
                packets,
                early: Default::default(),
            }),
            Ok(other) => Err(format!("connection refused or closed ({other:?})")),
            Err(_) => Err("no answer from the broker".into()),
        }
    }

    /// Subscribes at QoS 1 and waits for the broker's answer; panics if refused.
    pub async fn subscribe(&mut self, filter: &str) {
        assert!(
            self.try_subscribe(filter).await,
            "subscription to {filter} refused"
        );
    }

    /// Subscribes at QoS 1 and waits for the broker's answer: whether it granted it.
    pub async fn try_subscribe(&mut self, filter: &str) -> bool {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("subscribe request");
        loop {
            match self.next_packet().await {
                Packet::SubAck(ack) => {
                    return ack
                        .return_codes
                        .iter()
                        .all(|code| matches!(code, rumqttc::SubscribeReasonCode::Success(_)));
                }
                Packet::Publish(publish) => self.early.push_back(publish),
                _ => {}
            }
        }
    }

    /// Publishes and, at QoS 1, waits for the broker's acknowledgement.
    pub async fn publish(&mut self, topic: &str, qos: QoS, retain: bool, payload: &[u8]) {
        self.client
            .publish(topic, qos, retain, payload.to_vec())
            .await
            .expect("publish request");
        if qos == QoS::AtLeastOnce {
            loop {
                match self.next_packet().await {
                    Packet::PubAck(_) => break,
                    Packet::Publish(publish) => self.early.push_back(publish),
                    _ => {}
                }
            }
        }
    }

    /// Publishes at QoS 1: whether the broker acknowledged it (false: it closed the
    /// connection instead, as for a packet past its `max_packet_size`).
    pub async fn try_publish(&mut self, topic: &str, retain: bool, payload: &[u8]) -> bool {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload.to_vec())
            .await
            .expect("publish request");
        loop {
            match tokio::time::timeout(WAIT, self.packets.recv()).await {
                Ok(Some(Packet::PubAck(_))) => return true,
                Ok(Some(Packet::Publish(publish))) => self.early.push_back(publish),
                Ok(Some(Packet::Disconnect)) | Ok(None) => return false,
                Ok(Some(_)) => {}
                Err(_) => panic!("no answer to a publish within {WAIT:?}"),
            }
        }
    }

    /// The next message; panics after [`WAIT`].
    pub async fn next_message(&mut self) -> Publish {
        if let Some(publish) = self.early.pop_front() {
            return publish;
        }
        loop {
            if let Packet::Publish(publish) = self.next_packet().await {
                return publish;
            }
        }
    }

    async fn next_packet(&mut self) -> Packet {
        match tokio::time::timeout(WAIT, self.packets.recv()).await {
            Ok(Some(Packet::Disconnect)) | Ok(None) => {
                panic!("the test client's connection closed")
            }
            Ok(Some(packet)) => packet,
            Err(_) => panic!("no packet within {WAIT:?}"),
        }
    }

    /// Every message the broker sent this client before it answered one more request:
    /// the broker answers in order, so what it had queued for the client comes first.
    pub async fn messages_so_far(&mut self) -> Vec<Publish> {
        self.client
            .unsubscribe("$test/barrier/never-subscribed")
            .await
            .expect("unsubscribe request");
        let mut messages: Vec<Publish> = self.early.drain(..).collect();
        loop {
            match self.next_packet().await {
                Packet::UnsubAck(_) => return messages,
                Packet::Publish(publish) => messages.push(publish),
                _ => {}
            }
        }
    }

    /// The retained message of `topic`, as a new subscriber gets it.
    pub async fn retained(port: u16, topic: &str) -> Publish {
        let mut client = TestClient::connect(port, "mqtt-subscriber").await;
        client.subscribe(topic).await;
        let message = client.next_message().await;
        assert!(
            message.retain,
            "{topic}: expected the retained message, got a live one"
        );
        message
    }
}

/// Stored readings, as the storage tests check them.
pub mod stored {
    use bson::{doc, Document};
    use futures_util::TryStreamExt;
    use mongodb::Database;

    use crate::{Brokers, Service};

    /// The status changes stored for `device` (`online`, `offline`), oldest first.
    pub async fn status_history(db: &Database, device: &str) -> Vec<String> {
        let documents: Vec<Document> = db
            .collection::<Document>("status")
            .find(doc! { "device": device })
            .sort(doc! { "change": 1 })
            .await
            .expect("find")
            .try_collect()
            .await
            .expect("status changes");
        documents
            .iter()
            .map(|document| document.get_str("status").expect("status").to_string())
            .collect()
    }

    /// How many readings match `filter` (0 while the database does not answer).
    pub async fn count(db: &Database, filter: Document) -> u64 {
        db.collection::<Document>("readings")
            .count_documents(filter)
            .await
            .unwrap_or(0)
    }

    /// Waits until `readings` holds `expected` documents matching `filter`.
    pub async fn wait_for_readings(db: &Database, filter: Document, expected: u64) {
        crate::wait_for(
            &format!("{expected} readings matching {filter}"),
            || count(db, filter.clone()),
            |n| *n == expected,
        )
        .await;
    }

    /// (boot, seq) of every stored reading of `device`.
    pub async fn stored_seqs(db: &Database, device: &str) -> Vec<(String, i64)> {
        let documents: Vec<Document> = db
            .collection::<Document>("readings")
            .find(doc! { "device": device })
            .await
            .expect("find")
            .try_collect::<Vec<Document>>()
            .await
            .expect("documents");
        documents
            .iter()
            .map(|d| {
                (
                    d.get_str("boot").expect("boot").to_string(),
                    integer(d, "seq"),
                )
            })
            .collect()
    }

    /// An integer field, stored as 64 bits (MongoDB) or 32 (nx-27017 narrows small ones).
    pub fn integer(document: &Document, field: &str) -> i64 {
        document
            .get_i64(field)
            .or_else(|_| document.get_i32(field).map(i64::from))
            .unwrap_or_else(|_| panic!("{field} is not an integer in {document}"))
    }

    /// Asserts every seq from 1 to `count` is stored exactly once, in one boot.
    pub fn assert_exactly_once(seqs: &[(String, i64)], count: i64) {
        let unique: std::collections::BTreeSet<_> = seqs.iter().collect();
        assert_eq!(unique.len(), seqs.len(), "duplicates stored");
        let boots: std::collections::BTreeSet<_> = seqs.iter().map(|(boot, _)| boot).collect();
        assert_eq!(boots.len(), 1, "{boots:?}");
        let numbers: std::collections::BTreeSet<i64> = seqs.iter().map(|(_, seq)| *seq).collect();
        assert_eq!(numbers, (1..=count).collect(), "missing or extra seqs");
    }

    /// The flags of a sensor that publishes `count` JSON readings of `device` at QoS 1 as
    /// fast as it can.
    pub fn sensor_args(device: &str, count: &str) -> Vec<String> {
        [
            "--format",
            "json",
            "--qos",
            "1",
            "--interval",
            "0",
            "--no-retain",
            "--count",
            count,
            "--device",
            device,
        ]
        .map(String::from)
        .to_vec()
    }

    /// Starts a `temperature-sensor` with [`sensor_args`].
    pub fn start_sensor(brokers: &Brokers, device: &str, count: &str) -> Service {
        let args = sensor_args(device, count);
        brokers.start_edge(
            "temperature-sensor",
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        )
    }
}
