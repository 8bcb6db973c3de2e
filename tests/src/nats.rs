//! The NATS JetStream cloud tier of a test: three real `nats-server` nodes configured
//! by the project's own `scripts/nats-cluster config` on free ports, each a process the
//! test can SIGKILL on its own, with the relay and persister started against them.

use std::path::Path;

use async_nats::jetstream;
use iot_core::nats::STREAM;
use tempfile::TempDir;

use crate::proxy::Proxy;
use crate::{free_port, password, repo_root, service_command, wait_for_within, Brokers, Service};

/// How long a cluster's first answers may take: a leader elected, the stream set up, a
/// service's first connection over TLS. On a machine loaded by other tests (a Docker
/// tier building beside them) more than [`crate::WAIT`]; the tests do not time it.
pub const CLUSTER_WAIT: std::time::Duration = std::time::Duration::from_secs(90);

/// Three nodes of one cluster.
#[derive(Debug)]
pub struct NatsCluster {
    /// The client port of each node.
    pub ports: [u16; 3],
    monitors: [u16; 3],
    /// The route port of each node.
    routes: [u16; 3],
    nodes: [Option<Service>; 3],
    /// With [`NatsCluster::spawn_partitionable`]: the route from node `from` to node
    /// `to` goes through a proxy, `(from, to, proxy)`.
    links: Vec<(usize, usize, Proxy)>,
    /// With [`NatsCluster::spawn_tls`]: the CA the nodes' certificate is signed by.
    tls_ca: Option<std::path::PathBuf>,
    dir: TempDir,
}

/// `nats-server` from the PATH, or where Debian's package puts it (`/usr/sbin`, not on
/// every user's PATH).
fn nats_server() -> std::path::PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join("nats-server").is_file()))
        .unwrap_or(false);
    if on_path {
        "nats-server".into()
    } else {
        "/usr/sbin/nats-server".into()
    }
}

/// One HTTP GET on 127.0.0.1:`port`: the body of a 200 answer.
async fn http_get(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    let answer = String::from_utf8(answer).ok()?;
    if !answer.starts_with("HTTP/1.1 200") && !answer.starts_with("HTTP/1.0 200") {
        return None;
    }
    answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
}

/// A monitoring endpoint's JSON, if the server answers.
async fn monitor_json(port: u16, path: &str) -> Option<serde_json::Value> {
    serde_json::from_str(&http_get(port, path).await?).ok()
}

/// One HTTP GET on 127.0.0.1:`port`: whether it answered 200.
async fn http_ok(port: u16, path: &str) -> bool {
    http_get(port, path).await.is_some()
}

impl NatsCluster {
    /// Writes the configuration with relay users for `sites`, starts the three nodes
    /// and waits until JetStream has a leader (every node's `/healthz` answers 200).
    pub async fn spawn(sites: &[&str]) -> NatsCluster {
        Self::spawn_with(sites, false, false).await
    }

    /// The version of the nodes' `nats-server`, as it says it (`2.9.10`).
    pub async fn server_version(&self) -> String {
        let client = self.admin_client().await;
        // Connected once the server answered (its INFO came first).
        client.flush().await.expect("the cluster answers");
        client.server_info().version
    }

    /// As [`NatsCluster::spawn`], the clients' listeners on TLS only (a certificate from
    /// `mosquitto/certs.sh`); the services started by the cluster verify it against
    /// its CA (`CLOUD_TLS_CA`).
    pub async fn spawn_tls(sites: &[&str]) -> NatsCluster {
        Self::spawn_with(sites, false, true).await
    }

    /// The CA of a cluster spawned with TLS.
    pub fn tls_ca(&self) -> Option<&Path> {
        self.tls_ca.as_deref()
    }

    /// As [`NatsCluster::spawn`], each node's routes to the others through a proxy of
    /// the test's ([`Proxy`]), so that a node can be cut off ([`NatsCluster::isolate`]).
    pub async fn spawn_partitionable(sites: &[&str]) -> NatsCluster {
        Self::spawn_with(sites, true, false).await
    }

    async fn spawn_with(sites: &[&str], partitionable: bool, tls: bool) -> NatsCluster {
        let dir = tempfile::Builder::new()
            .prefix("iot-nats-")
            .tempdir()
            .expect("a temporary folder");
        // Nodes are killed and started again on their ports, perhaps minutes later.
        let keep = crate::free_port_to_keep;
        let ports = [keep(), keep(), keep()];
        let routes = [keep(), keep(), keep()];
        let monitors = [keep(), keep(), keep()];
        let list = |ports: &[u16; 3]| {
            ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        };
        let sites = sites
            .iter()
            .map(|site| format!("{site}:{}", password(&format!("edge-relay-{site}"))))
            .collect::<Vec<_>>()
            .join(" ");
        let certs = dir.path().join("certs");
        let tls_ca = tls.then(|| {
            crate::make_certificates(&certs);
            certs.join("ca.crt")
        });
        let mut script = std::process::Command::new(repo_root().join("scripts/nats-cluster"));
        let status = script
            .args(["config", &dir.path().display().to_string()])
            .env("NATS_PERSISTER_PASSWORD", password("mongo-persister"))
            .env("NATS_SITES", sites)
            .env("NATS_PORTS", list(&ports))
            .env("NATS_ROUTE_PORTS", list(&routes))
            .env("NATS_MONITOR_PORTS", list(&monitors))
            .envs(tls.then_some(("NATS_CERTS_DIR", &certs)))
            .status()
            .expect("cannot run scripts/nats-cluster");
        assert!(status.success(), "scripts/nats-cluster config failed");
        let mut cluster = NatsCluster {
            ports,
            monitors,
            routes,
            nodes: [None, None, None],
            links: Vec::new(),
            tls_ca,
            dir,
        };
        if partitionable {
            cluster.route_through_proxies(routes).await;
        }
        for node in 0..3 {
            cluster.start(node);
        }
        for port in cluster.monitors {
            wait_for_within(
                CLUSTER_WAIT,
                "a JetStream leader (every node's /healthz)",
                || http_ok(port, "/healthz"),
                |ok| *ok,
            )
            .await;
        }
        cluster
    }

    /// Rewrites each node's routes to go through a proxy per pair of nodes.
    async fn route_through_proxies(&mut self, routes: [u16; 3]) {
        // Made by scripts/nats-cluster, as no NATS_ROUTE_PASSWORD is given.
        let password = self.route_password();
        for from in 0..3 {
            let mut urls = Vec::new();
            for to in (0..3).filter(|to| *to != from) {
                let proxy = Proxy::start(routes[to]).await;
                urls.push(format!(
                    "\"nats-route://route:{}@127.0.0.1:{}\"",
                    password, proxy.port
                ));
                self.links.push((from, to, proxy));
            }
            let path = self.config(from);
            let config = std::fs::read_to_string(&path).expect("the node's configuration");
            // Nodes tell each other their route address, and connect to one they hear
            // of and are not connected to: past the proxies, a cut node would be back
            // at once. A port nobody listens on (it is never needed: every node names
            // both others) leaves only the proxies.
            let nowhere = free_port();
            let config: Vec<String> = config
                .lines()
                .map(|line| {
                    if line.trim_start().starts_with("routes:") {
                        format!(
                            "  routes: [ {} ]\n  advertise: \"127.0.0.1:{nowhere}\"",
                            urls.join(", ")
                        )
                    } else {
                        line.to_string()
                    }
                })
                .collect();
            std::fs::write(&path, config.join("\n") + "\n").expect("the node's configuration");
        }
    }

    /// Cuts node `node` off from the other two: every route to or from it closed and
    /// refused, while its clients stay connected to it.
    pub fn isolate(&self, node: usize) {
        for (from, to, proxy) in &self.links {
            if *from == node || *to == node {
                proxy.cut();
            }
        }
    }

    /// Every route carried again.
    pub fn heal(&self) {
        for (_, _, proxy) in &self.links {
            proxy.heal();
        }
    }

    /// A nats-server of no cluster's that tries to join this one as a route to node
    /// `node`'s route port, with `credentials` (`user:password`, or none); and its id,
    /// once it answers.
    pub async fn rogue_route(&self, node: usize, credentials: Option<&str>) -> (Service, String) {
        let monitor = free_port();
        let userinfo = credentials.map(|c| format!("{c}@")).unwrap_or_default();
        let mut command = tokio::process::Command::new(nats_server());
        command.args([
            "-a",
            "127.0.0.1",
            "-p",
            &free_port().to_string(),
            "-m",
            &monitor.to_string(),
            "--cluster_name",
            "iot",
            "--cluster",
            &format!("nats://127.0.0.1:{}", free_port()),
            "--routes",
            &format!("nats-route://{userinfo}127.0.0.1:{}", self.routes[node]),
        ]);
        let rogue = Service::spawn("rogue-route", command);
        let id = crate::wait_for_within(
            CLUSTER_WAIT,
            "the server's id (its /varz)",
            || async {
                let value = monitor_json(monitor, "/varz").await?;
                value["server_id"].as_str().map(str::to_string)
            },
            Option::is_some,
        )
        .await;
        (rogue, id.unwrap_or_default())
    }

    /// The ids of the servers node `node` has a route with now.
    pub async fn route_ids_of(&self, node: usize) -> Vec<String> {
        let Some(value) = monitor_json(self.monitors[node], "/routez").await else {
            return Vec::new();
        };
        value["routes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|route| route["remote_id"].as_str().map(str::to_string))
            .collect()
    }

    /// The node the process `pid` is connected to now (a connection named
    /// `… pid <pid>`, as mongo-persister names its own), by each running node's `/connz`.
    pub async fn node_of(&self, pid: u32) -> Option<usize> {
        let name = format!(" pid {pid}");
        for (node, port) in self.monitors.iter().enumerate() {
            let Some(value) = monitor_json(*port, "/connz?limit=4096").await else {
                continue;
            };
            let named = value["connections"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|connection| {
                    connection["name"]
                        .as_str()
                        .is_some_and(|named| named.ends_with(&name))
                });
            if named {
                return Some(node);
            }
        }
        None
    }

    /// The number of routes node `node` has now (its `/routez`), if it answers.
    pub async fn routes_of(&self, node: usize) -> Option<usize> {
        let value = monitor_json(self.monitors[node], "/routez").await?;
        value["num_routes"].as_u64().map(|n| n as usize)
    }

    /// The routes' password scripts/nats-cluster made for this cluster.
    pub fn route_password(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("route.secret"))
            .expect("the routes' password")
            .trim()
            .to_string()
    }

    /// Starts node `node` (0, 1 or 2) from its configuration.
    pub fn start(&mut self, node: usize) {
        let mut command = tokio::process::Command::new(nats_server());
        command.arg("-c").arg(self.config(node));
        self.nodes[node] = Some(Service::spawn(&format!("nats-node-{}", node + 1), command));
    }

    fn config(&self, node: usize) -> std::path::PathBuf {
        self.dir.path().join(format!("node-{}.conf", node + 1))
    }

    /// `nats://127.0.0.1:PORT` of every node, comma-separated: `CLOUD_BROKER`.
    pub fn address(&self) -> String {
        self.ports
            .iter()
            .map(|port| format!("nats://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts every node that is not running and waits until JetStream has a leader
    /// again (every node's `/healthz`).
    pub async fn start_all(&mut self) {
        for node in 0..3 {
            if self.nodes[node].is_none() {
                self.start(node);
            }
        }
        for port in self.monitors {
            crate::wait_for_within(
                std::time::Duration::from_secs(60),
                "a JetStream leader again (every node's /healthz)",
                || http_ok(port, "/healthz"),
                |ok| *ok,
            )
            .await;
        }
    }

    /// SIGKILLs node `node`.
    /// Starts node `node` again (after [`NatsCluster::kill`]) and waits until its
    /// `/healthz` answers 200: JetStream on it is current again.
    pub async fn restart(&mut self, node: usize) {
        self.start(node);
        wait_for_within(
            CLUSTER_WAIT,
            "the node started again to be current (its /healthz)",
            || http_ok(self.monitors[node], "/healthz"),
            |ok| *ok,
        )
        .await;
    }

    pub async fn kill(&mut self, node: usize) {
        if let Some(mut service) = self.nodes[node].take() {
            service.kill().await;
        }
    }

    /// What node `node` logged.
    pub fn log(&self, node: usize) -> String {
        self.nodes[node]
            .as_ref()
            .map(Service::stderr)
            .unwrap_or_default()
    }

    /// The environment of a service on the cluster: its address, and its CA with TLS.
    fn cloud_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![("CLOUD_BROKER", self.address())];
        if let Some(ca) = &self.tls_ca {
            env.push(("CLOUD_TLS_CA", ca.display().to_string()));
        }
        env
    }

    /// A JetStream connection as the persister's user (it may read the stream).
    pub async fn admin(&self) -> jetstream::Context {
        self.admin_of(&self.address()).await
    }

    /// What the stream and the persisters' consumer say of themselves, for a failure's
    /// message.
    pub async fn describe(&self) -> String {
        let js = self.admin().await;
        let mut said = String::new();
        match js.get_stream(STREAM).await {
            Ok(mut stream) => {
                match stream.info().await {
                    Ok(info) => said += &format!("stream: {:?}\n", info.state),
                    Err(error) => said += &format!("stream info: {error}\n"),
                }
                match stream
                    .get_consumer::<jetstream::consumer::pull::Config>(iot_core::nats::CONSUMER)
                    .await
                {
                    Ok(mut consumer) => match consumer.info().await {
                        Ok(info) => said += &format!(
                            "consumer: delivered {:?}, acknowledged {:?}, pending {}, waiting {}, unacknowledged {}, redelivered {}\n",
                            info.delivered, info.ack_floor, info.num_pending, info.num_waiting,
                            info.num_ack_pending, info.num_redelivered
                        ),
                        Err(error) => said += &format!("consumer info: {error}\n"),
                    },
                    Err(error) => said += &format!("consumer: {error}\n"),
                }
            }
            Err(error) => said += &format!("stream: {error}\n"),
        }
        said
    }

    /// The same, connected to node `node` alone.
    pub async fn admin_at(&self, node: usize) -> jetstream::Context {
        self.admin_of(&format!("nats://127.0.0.1:{}", self.ports[node]))
            .await
    }

    async fn admin_of(&self, address: &str) -> jetstream::Context {
        jetstream::new(self.client_of(address).await)
    }

    /// A client of the persister's user, on any node.
    async fn admin_client(&self) -> async_nats::Client {
        self.client_of(&self.address()).await
    }

    async fn client_of(&self, address: &str) -> async_nats::Client {
        iot_core::nats::NatsSettings::parse(
            address,
            Some("mongo-persister".into()),
            Some(password("mongo-persister")),
        )
        .expect("the cluster's address")
        .with_tls_ca(self.tls_ca.clone())
        .connect("test")
        .await
        .expect("a NATS client")
    }

    /// The node (0, 1 or 2) that leads the stream now, if it has a leader.
    pub async fn stream_leader(&self, js: &jetstream::Context) -> Option<usize> {
        let mut stream = js.get_stream(STREAM).await.ok()?;
        let info = stream.info().await.ok()?;
        let leader = info.cluster.as_ref()?.leader.clone()?;
        leader
            .strip_prefix("node-")?
            .parse::<usize>()
            .ok()?
            .checked_sub(1)
    }

    /// A client logged in as `user` (its password from the test's secrets) whose
    /// server errors (permission violations) come out of the receiver.
    pub async fn client_as(
        &self,
        user: &str,
    ) -> (
        async_nats::Client,
        tokio::sync::mpsc::UnboundedReceiver<String>,
    ) {
        let (errors_tx, errors) = tokio::sync::mpsc::unbounded_channel();
        let mut options = async_nats::ConnectOptions::new();
        if let Some(ca) = &self.tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        let client = options
            .user_and_password(user.to_string(), password(user))
            .custom_inbox_prefix(iot_core::nats::inbox_prefix(user))
            .event_callback(move |event| {
                let errors_tx = errors_tx.clone();
                async move {
                    if let async_nats::Event::ServerError(error) = event {
                        let _ = errors_tx.send(error.to_string());
                    }
                }
            })
            .connect(self.address().split(',').collect::<Vec<_>>())
            .await
            .expect("a NATS client");
        (client, errors)
    }

    /// Starts `mongo-persister` on the cluster, logged in as its user, with `args`.
    pub fn start_persister(
        &self,
        brokers: &Brokers,
        mongo: &crate::MongoServer,
        args: &[&str],
    ) -> Service {
        let mut env = self.cloud_env();
        env.extend([
            ("MONGODB_URI", mongo.uri().to_string()),
            ("MONGODB_DATABASE", mongo.database_name().to_string()),
        ]);
        let mut command = service_command(
            "mongo-persister",
            brokers.dir(),
            0,
            Some("mongo-persister"),
            args,
            &env,
        );
        command.env_remove("CLOUD_PORT");
        Service::spawn("mongo-persister", command)
    }

    /// [`NatsCluster::start_persister`], once it has set up the stream and its consumer
    /// (a cluster under load may take a while to answer its first requests).
    pub async fn persister_ready(
        &self,
        brokers: &Brokers,
        mongo: &crate::MongoServer,
        args: &[&str],
    ) -> Service {
        let persister = self.start_persister(brokers, mongo, args);
        persister
            .wait_for_log_within(CLUSTER_WAIT, "the NATS stream is set up")
            .await;
        persister
    }

    /// [`NatsCluster::start_relay`], once it takes from the edge broker.
    pub async fn relay_ready(
        &self,
        brokers: &Brokers,
        site: &str,
        log_dir: &Path,
        args: &[&str],
    ) -> Service {
        let relay = self.start_relay(brokers, site, log_dir, args);
        relay
            .wait_for_log_within(CLUSTER_WAIT, "subscribed on the edge broker")
            .await;
        relay
    }

    /// Starts `edge-relay` of `site` from the edge broker of `brokers` into the cluster,
    /// its log in `log_dir`.
    pub fn start_relay(
        &self,
        brokers: &Brokers,
        site: &str,
        log_dir: &Path,
        args: &[&str],
    ) -> Service {
        self.start_relay_at(brokers, &brokers.local, site, log_dir, args)
    }

    /// As [`NatsCluster::start_relay`], from edge broker `edge` (another site's,
    /// [`Brokers::spawn_relay_site`]).
    pub fn start_relay_at(
        &self,
        brokers: &Brokers,
        edge: &crate::Broker,
        site: &str,
        log_dir: &Path,
        args: &[&str],
    ) -> Service {
        let user = format!("edge-relay-{site}");
        let mut env = self.cloud_env();
        env.extend([
            ("CLOUD_USERNAME", user.clone()),
            ("CLOUD_PASSWORD", password(&user)),
            ("RELAY_LOG_DIR", log_dir.display().to_string()),
            ("EDGE_SITE", site.to_string()),
            // The edge broker's accounts, as the native stack and compose give them.
            (
                "RELAY_ACCOUNTS",
                edge.conf_dir().join("acl").display().to_string(),
            ),
        ]);
        let command = service_command(
            "edge-relay",
            brokers.dir(),
            edge.port,
            Some("edge-relay"),
            args,
            &env,
        );
        Service::spawn("edge-relay", command)
    }
}
