//! What can be checked of the docker compose stack without a Docker engine: the file
//! resolves with `.env.example`, every built service runs a binary the image has, every
//! mounted file exists, the brokers run the same `mosquitto/` set-up as the native
//! tests, the dashboard runs the pinned Node-RED with the project's flows, and only the
//! ports a user needs are published.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository")
        .to_path_buf()
}

/// A Compose implementation users have: the v2 plugin (`docker compose`, Docker Desktop
/// and docker-compose-plugin) or Debian's docker-compose 1.29. They print the same
/// configuration in different forms (v2 writes volumes in long form).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Implementation {
    Plugin,
    V1,
}

thread_local! {
    static CURRENT: std::cell::Cell<Implementation> = const { std::cell::Cell::new(Implementation::Plugin) };
}

/// The implementations on this machine: every test reads the configuration with each.
fn implementations() -> Vec<Implementation> {
    let answers = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .is_ok_and(|output| output.status.success())
    };
    let mut found = Vec::new();
    if answers("docker", &["compose", "version"]) {
        found.push(Implementation::Plugin);
    }
    if answers("docker-compose", &["version"]) {
        found.push(Implementation::V1);
    }
    assert!(
        !found.is_empty(),
        "no docker compose: install docker-compose (scripts/test does)"
    );
    found
}

/// Runs `check` once with each Compose implementation there is.
fn with_each_compose(check: impl Fn()) {
    for implementation in implementations() {
        eprintln!("with {implementation:?}");
        CURRENT.with(|current| current.set(implementation));
        check();
    }
}

/// The current implementation, on `compose.yaml`.
fn compose() -> Command {
    compose_files(&["compose.yaml"])
}

/// As [`compose`], on `files` (the later ones override the earlier).
fn compose_files(files: &[&str]) -> Command {
    let mut command = match CURRENT.with(std::cell::Cell::get) {
        Implementation::Plugin => {
            let mut command = Command::new("docker");
            command.arg("compose");
            command
        }
        Implementation::V1 => Command::new("docker-compose"),
    };
    command
        .current_dir(repo())
        .args(["--env-file", ".env.example"])
        .args(files.iter().flat_map(|file| ["-f", file]))
        // Every service, those under a profile included.
        .args([
            "--profile",
            "dashboard",
            "--profile",
            "tools",
            "--profile",
            "monitoring",
        ]);
    command
}

/// The configuration as compose resolves it (anchors merged, variables filled in).
fn resolved() -> Yaml {
    resolved_with(compose())
}

/// The configuration `command` resolves.
fn resolved_with(mut command: Command) -> Yaml {
    let output = command
        .arg("config")
        .output()
        .expect("no docker compose: install docker-compose (scripts/test does)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "compose.yaml does not resolve: {stderr}"
    );
    assert!(!stderr.contains("WARN"), "compose warns: {stderr}");
    let text = String::from_utf8(output.stdout).expect("utf-8");
    YamlLoader::load_from_str(&text)
        .expect("compose prints YAML")
        .remove(0)
}

fn services(config: &Yaml) -> Vec<(String, Yaml)> {
    config["services"]
        .as_hash()
        .expect("services")
        .iter()
        .map(|(name, service)| (name.as_str().expect("name").to_string(), service.clone()))
        .collect()
}

/// A service's volumes as `SOURCE:TARGET[:ro]`, from either form compose prints.
fn volumes(value: &Yaml) -> Vec<String> {
    value
        .as_vec()
        .into_iter()
        .flatten()
        .filter_map(|volume| match volume {
            Yaml::String(text) => Some(text.clone()),
            Yaml::Hash(_) => {
                let source = volume["source"].as_str()?;
                let target = volume["target"].as_str()?;
                let read_only = volume["read_only"].as_bool() == Some(true);
                Some(format!(
                    "{source}:{target}{}",
                    if read_only { ":ro" } else { "" }
                ))
            }
            _ => None,
        })
        .collect()
}

fn strings(value: &Yaml) -> Vec<String> {
    match value {
        Yaml::Array(items) => items
            .iter()
            .filter_map(|item| item.as_str().map(String::from))
            .collect(),
        Yaml::String(text) => vec![text.clone()],
        _ => Vec::new(),
    }
}

/// The image the Dockerfile builds, which every service of ours runs.
const PIPELINE_IMAGE: &str = "iot-pipeline:local";

#[test]
fn no_two_services_build_the_same_image() {
    with_each_compose(|| {
        // Each build tags its image; two builds of one tag fail a fresh buildx/bake build
        // ("image already exists"), so one service builds and the others run the result.
        for files in [
            &["compose.yaml"][..],
            &["compose.yaml", "compose.replicas.yaml"],
        ] {
            let config = resolved_with(compose_files(files));
            let mut builders: Vec<(String, String)> = services(&config)
                .into_iter()
                .filter(|(_, service)| !service["build"].is_badvalue())
                .map(|(name, service)| {
                    let image = service["image"].as_str().unwrap_or_default().to_string();
                    (image, name)
                })
                .collect();
            builders.sort();
            let images: BTreeSet<&String> = builders.iter().map(|(image, _)| image).collect();
            assert_eq!(images.len(), builders.len(), "{files:?}: {builders:?}");
            assert!(
                builders.iter().any(|(image, _)| image == PIPELINE_IMAGE),
                "nobody builds {PIPELINE_IMAGE}"
            );
        }
    });
}

#[test]
fn the_producers_start_once_the_relay_and_the_persister_have_subscribed() {
    with_each_compose(|| {
        let config = resolved();
        let persister = &config["services"]["mongo-persister"];
        assert_eq!(
            strings(&persister["healthcheck"]["test"]),
            READY_CHECK,
            "the persister is healthy once /health/ready says so (subscribed, database reached)"
        );
        for producer in ["temperature-sensor", "pressure-sensor", "device-status"] {
            for carrier in ["edge-relay", "mongo-persister"] {
                assert_eq!(
                    config["services"][producer]["depends_on"][carrier]["condition"].as_str(),
                    Some("service_healthy"),
                    "{producer} may start before {carrier} has subscribed"
                );
            }
        }
        // The persister itself does not wait for the database to subscribe.
        assert_eq!(
            persister["depends_on"]["mongo"]["condition"].as_str(),
            Some("service_started")
        );
    });
}

#[test]
fn the_database_is_healthy_once_the_application_user_logs_in_to_the_real_server() {
    with_each_compose(|| {
        let config = resolved();
        let check = strings(&config["services"]["mongo"]["healthcheck"]["test"]).join(" ");
        assert!(
            check.contains("MONGO_APP_USERNAME") && check.contains("MONGO_APP_PASSWORD"),
            "{check}"
        );
        // The first-start initialisation server listens on 127.0.0.1 only.
        assert!(check.contains("@mongo:27017/"), "{check}");
        assert!(
            !check.contains("localhost") && !check.contains("127.0.0.1"),
            "{check}"
        );
    });
}

#[test]
fn scripts_keep_lf_line_endings_and_the_build_context_stays_small() {
    for file in [
        "scripts/dev-stack",
        "mosquitto/setup.sh",
        "mongo/init-app-user.sh",
        "Procfile",
    ] {
        let output = Command::new("git")
            .args(["check-attr", "eol", "--", file])
            .current_dir(repo())
            .output()
            .expect("git runs");
        let answer = String::from_utf8_lossy(&output.stdout);
        assert!(answer.trim_end().ends_with("eol: lf"), "{answer}");
    }
    let ignored = std::fs::read_to_string(repo().join(".dockerignore")).expect(".dockerignore");
    for path in [
        "target",
        ".env",
        "fuzz/target",
        "fuzz/corpus",
        "fuzz/artifacts",
    ] {
        assert!(
            ignored.lines().any(|line| line.trim() == path),
            "{path} is sent to the Docker build"
        );
    }
}

#[test]
fn every_built_service_runs_a_binary_of_the_workspace_that_the_image_has() {
    with_each_compose(|| {
        let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
        let mut binaries = BTreeSet::new();
        for (name, service) in services(&resolved()) {
            // Node-RED's image is built from nodered/ (checked below).
            if service["image"].as_str() != Some(PIPELINE_IMAGE) {
                continue;
            }
            let program = strings(&service["entrypoint"])
                .into_iter()
                .chain(strings(&service["command"]))
                .next()
                .unwrap_or_else(|| panic!("{name} names no program"));
            if program == "certs.sh" {
                assert!(dockerfile.contains("COPY mosquitto/certs.sh /usr/local/bin/certs.sh"));
                continue;
            }
            if program == "mosquitto-exporter" {
                assert!(dockerfile.contains(
                    "COPY monitoring/mosquitto-exporter.sh /usr/local/bin/mosquitto-exporter"
                ));
                assert!(dockerfile.contains("prometheus-mqtt-exporter"));
                continue;
            }
            assert!(
                repo()
                    .join("crates")
                    .join(&program)
                    .join("src/main.rs")
                    .is_file(),
                "{name} runs {program}, which is no binary of the workspace"
            );
            assert!(
                dockerfile.contains(&format!("/src/target/release/{program}")),
                "the image lacks {program}"
            );
            binaries.insert(program);
        }
        let expected = [
            "device-status",
            "edge-relay",
            "mongo-persister",
            "mqtt-subscriber",
            "pressure-sensor",
            "readings",
            "temperature-sensor",
        ];
        assert_eq!(binaries, expected.iter().map(|b| b.to_string()).collect());
    });
}

#[test]
fn every_mounted_file_exists_and_the_brokers_run_the_native_set_up() {
    with_each_compose(|| {
        let config = resolved();
        for (name, service) in services(&config) {
            for volume in volumes(&service["volumes"]) {
                let source = volume.split(':').next().expect("source");
                if source.starts_with('/') {
                    assert!(
                        Path::new(source).exists(),
                        "{name} mounts {source}, which does not exist"
                    );
                }
            }
        }
        for (name, side) in [("mosquitto-local", "local"), ("mosquitto-cloud", "cloud")] {
            let service = &config["services"][name];
            assert_eq!(service["image"].as_str(), Some("eclipse-mosquitto:2"));
            let volumes = volumes(&service["volumes"]);
            let templates = repo().join("mosquitto").display().to_string();
            assert!(
                volumes
                    .iter()
                    .any(|v| v.starts_with(&format!("{templates}:/templates"))),
                "{name} does not mount mosquitto/: {volumes:?}"
            );
            let entrypoint = strings(&service["entrypoint"]).join(" ");
            assert!(
                entrypoint.contains(&format!("/templates/setup.sh {side} ")),
                "{name} does not render its configuration with mosquitto/setup.sh: {entrypoint}"
            );
        }
    });
}

#[test]
fn only_the_ports_a_user_needs_are_published() {
    with_each_compose(|| {
        let mut published = BTreeSet::new();
        for (name, service) in services(&resolved()) {
            for port in service["ports"].as_vec().into_iter().flatten() {
                let described = match port {
                    Yaml::Hash(_) => format!(
                        "{}{}:{}",
                        port["host_ip"]
                            .as_str()
                            .map(|ip| format!("{ip}:"))
                            .unwrap_or_default(),
                        port["published"]
                            .as_i64()
                            .map(|p| p.to_string())
                            .or_else(|| port["published"].as_str().map(String::from))
                            .unwrap_or_default(),
                        port["target"].as_i64().unwrap_or_default()
                    ),
                    other => other.as_str().unwrap_or_default().to_string(),
                };
                published.insert(format!("{name} {}", described.trim_end_matches("/tcp")));
            }
        }
        let expected = [
            "mongo 127.0.0.1:27017:27017",
            "mosquitto-cloud 8883:8883",
            "mosquitto-local 1883:1883",
            "nodered 127.0.0.1:1880:1880",
            "prometheus 127.0.0.1:9090:9090",
        ];
        assert_eq!(published, expected.iter().map(|p| p.to_string()).collect());
    });
}

/// The healthcheck of every long-running service of ours.
const READY_CHECK: [&str; 6] = [
    "CMD",
    "curl",
    "-fsS",
    "-o",
    "/dev/null",
    "http://127.0.0.1:9464/health/ready",
];

/// Our long-running services: each serves metrics and health on 9464.
const OURS: [&str; 6] = [
    "edge-relay",
    "mongo-persister",
    "temperature-sensor",
    "pressure-sensor",
    "device-status",
    "mqtt-subscriber",
];

#[test]
fn every_service_of_ours_is_healthy_by_its_health_endpoint_and_prometheus_scrapes_it() {
    with_each_compose(|| {
        let config = resolved();
        for name in OURS {
            let service = &config["services"][name];
            assert_eq!(
                strings(&service["healthcheck"]["test"]),
                READY_CHECK,
                "{name}"
            );
            let environment = service["environment"].as_hash().expect("environment");
            let address = environment
                .iter()
                .find(|(key, _)| {
                    key.as_str()
                        .is_some_and(|key| key.ends_with("_METRICS_ADDRESS"))
                })
                .and_then(|(_, value)| value.as_str());
            assert_eq!(address, Some("0.0.0.0:9464"), "{name} serves no metrics");
        }
        // The monitoring profile: Prometheus with monitoring/, scraping every service of
        // ours and an exporter per broker, each exporter reading its broker.
        let prometheus = &config["services"]["prometheus"];
        assert_eq!(strings(&prometheus["profiles"]), ["monitoring"]);
        let monitoring = repo().join("monitoring").display().to_string();
        assert!(
            volumes(&prometheus["volumes"])
                .iter()
                .any(|volume| volume.starts_with(&format!("{monitoring}:/etc/prometheus"))),
            "Prometheus does not read monitoring/"
        );
        let targets = |file: &str| -> Vec<String> {
            let text = std::fs::read_to_string(repo().join("monitoring/targets").join(file))
                .expect("targets file");
            let entries: serde_json::Value = serde_json::from_str(&text).expect("JSON");
            entries
                .as_array()
                .expect("a list")
                .iter()
                .flat_map(|entry| entry["targets"].as_array().cloned().unwrap_or_default())
                .filter_map(|target| target.as_str().map(String::from))
                .collect()
        };
        let expected: Vec<String> = OURS.iter().map(|name| format!("{name}:9464")).collect();
        assert_eq!(targets("pipeline.json"), expected);
        let mut exporters = Vec::new();
        for broker in ["mosquitto-local", "mosquitto-cloud"] {
            let exporter = format!("{broker}-exporter");
            let service = &config["services"][exporter.as_str()];
            assert_eq!(
                strings(&service["command"]),
                ["mosquitto-exporter", &format!("{broker}:1883")],
                "{exporter}"
            );
            exporters.push(format!("{exporter}:9641"));
        }
        assert_eq!(targets("brokers.json"), exporters);
    });
}

/// Each persister service's client id and shared-subscription group.
fn persisters(config: &Yaml) -> Vec<(String, Option<String>, Option<String>)> {
    services(config)
        .into_iter()
        .filter(|(_, service)| {
            strings(&service["command"]).first().map(String::as_str) == Some("mongo-persister")
        })
        .map(|(name, service)| {
            let env = &service["environment"];
            let get = |key: &str| env[key].as_str().map(String::from);
            (name, get("PERSISTER_CLIENT_ID"), get("PERSISTER_SHARE"))
        })
        .collect()
}

#[test]
fn one_persister_by_default_and_named_replicas_to_scale_out() {
    with_each_compose(|| {
        let single = persisters(&resolved());
        assert_eq!(
            single,
            [(
                "mongo-persister".to_string(),
                Some("mongo-persister".to_string()),
                None
            )],
            "by default one persister, a fixed client id, no shared subscription"
        );
        let replicas = persisters(&resolved_with(compose_files(&[
            "compose.yaml",
            "compose.replicas.yaml",
        ])));
        assert!(replicas.len() >= 2, "{replicas:?}");
        let ids: BTreeSet<&str> = replicas
            .iter()
            .map(|(name, id, share)| {
                assert_eq!(
                    share.as_deref(),
                    Some("persisters"),
                    "{name} shares the stream"
                );
                id.as_deref()
                    .unwrap_or_else(|| panic!("{name} has no fixed client id"))
            })
            .collect();
        assert_eq!(
            ids.len(),
            replicas.len(),
            "two replicas under one client id"
        );
        assert!(
            ids.contains("mongo-persister"),
            "the first replica keeps the single persister's session"
        );
    });
}

#[test]
fn every_variable_compose_needs_is_in_env_example() {
    let compose_file = [
        "compose.yaml",
        "compose.replicas.yaml",
        "compose.cluster.yaml",
    ]
    .map(|file| std::fs::read_to_string(repo().join(file)).expect("compose file"))
    .concat();
    let example = std::fs::read_to_string(repo().join(".env.example")).expect(".env.example");
    let defined: BTreeSet<&str> = example
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .filter_map(|line| line.split_once('=').map(|(key, _)| key.trim()))
        .collect();
    for part in compose_file.split("${").skip(1) {
        let name: String = part
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let has_default = part[name.len()..].starts_with(":-");
        assert!(
            has_default || defined.contains(name.as_str()),
            "compose.yaml needs {name}, which .env.example lacks"
        );
    }
}

/// `compose.cluster.yaml`, as Compose v2.24+ reads it (it removes `CLOUD_PORT` with
/// `!reset`, which docker-compose 1.29 does not know): the cloud on three `nats:2.9`
/// nodes, each run from its own configuration, with the stream's store and the
/// configuration of `scripts/nats-cluster`; the relay and the persister on `nats://`
/// addresses of all three, over TLS, without `CLOUD_PORT`, the relay as its site's user;
/// no cloud Mosquitto.
#[test]
fn compose_cluster_yaml_puts_the_cloud_on_three_nats_nodes() {
    if !implementations().contains(&Implementation::Plugin) {
        tests::skipped("compose.cluster.yaml needs Compose v2 (`docker compose`)");
        return;
    }
    let mut command = Command::new("docker");
    command
        .arg("compose")
        .current_dir(repo())
        .args(["--env-file", ".env.example"])
        .args(["-f", "compose.yaml", "-f", "compose.cluster.yaml"]);
    let config = resolved_with(command);
    let names: BTreeSet<String> = services(&config)
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    assert!(!names.contains("mosquitto-cloud"), "{names:?}");
    for node in 1..=3 {
        let service = &config["services"][format!("nats-{node}").as_str()];
        assert_eq!(service["image"].as_str(), Some("nats:2.9"));
        assert_eq!(
            strings(&service["command"]),
            ["-c", &format!("/nats/node-{node}.conf")]
        );
    }
    let setup = strings(&config["services"]["nats-config"]["entrypoint"]).join(" ");
    assert!(
        setup.contains("/scripts/nats-cluster config /nats"),
        "{setup}"
    );
    let cloud = "nats://nats-1:4222,nats://nats-2:4222,nats://nats-3:4222";
    for (name, user) in [
        ("edge-relay", "edge-relay-edge"),
        ("mongo-persister", "mongo-persister"),
    ] {
        let env = &config["services"][name]["environment"];
        assert_eq!(env["CLOUD_BROKER"].as_str(), Some(cloud), "{name}");
        assert_eq!(env["CLOUD_USERNAME"].as_str(), Some(user), "{name}");
        assert_eq!(
            env["CLOUD_TLS_CA"].as_str(),
            Some("/nats-ca/ca.crt"),
            "{name}"
        );
        assert!(env["CLOUD_PORT"].is_badvalue(), "{name} keeps CLOUD_PORT");
    }
}

#[test]
fn the_dashboard_runs_the_pinned_node_red_with_the_projects_flows() {
    with_each_compose(|| {
        let config = resolved();
        let nodered = &config["services"]["nodered"];
        assert_eq!(strings(&nodered["profiles"]), ["dashboard"]);

        // The image: the official one, at the node-red version nodered/package.json pins.
        let package: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(repo().join("nodered/package.json")).expect("package.json"),
        )
        .expect("package.json is JSON");
        let pinned = package["dependencies"]["node-red"]
            .as_str()
            .expect("node-red pinned");
        let dockerfile =
            std::fs::read_to_string(repo().join("nodered/Dockerfile")).expect("nodered/Dockerfile");
        assert!(
            dockerfile.contains(&format!("ARG NODE_RED_VERSION={pinned}\n")),
            "nodered/Dockerfile does not build Node-RED {pinned}"
        );
        assert!(dockerfile.contains("FROM nodered/node-red:${NODE_RED_VERSION}"));
        assert!(
            strings(&nodered["build"]["context"])
                .iter()
                .any(|context| Path::new(context) == repo().join("nodered")),
            "nodered is not built from nodered/"
        );

        // The project's settings and flows, from the mounted nodered/ folder.
        let mount = format!("{}:/nodered", repo().join("nodered").display());
        assert!(
            volumes(&nodered["volumes"])
                .iter()
                .any(|v| v.starts_with(&mount)),
            "nodered/ is not mounted at /nodered"
        );
        assert_eq!(
            strings(&nodered["command"]),
            ["--settings", "/nodered/settings.js"]
        );
        let environment = &nodered["environment"];
        assert_eq!(environment["FLOWS"].as_str(), Some("/nodered/flows.json"));
        assert_eq!(
            environment["CLOUD_BROKER"].as_str(),
            Some("mosquitto-cloud")
        );
        // The cloud broker creates the dashboard's user from the same password.
        assert_eq!(
            config["services"]["mosquitto-cloud"]["environment"]["DASHBOARD_PASSWORD"],
            environment["DASHBOARD_PASSWORD"]
        );
        assert!(environment["DASHBOARD_PASSWORD"]
            .as_str()
            .is_some_and(|password| !password.is_empty()));
    });
}

/// edge-relay forwards by default; `compose.bridge.yaml` puts Mosquitto's bridge in
/// its place, and the edge-relay service (which the producers wait for) then only
/// watches the bridge's connection.
#[test]
fn edge_relay_forwards_by_default_and_compose_bridge_yaml_switches_to_the_bridge() {
    with_each_compose(|| {
        let forwarder = |config: &Yaml| {
            config["services"]["mosquitto-local"]["environment"]["EDGE_FORWARDER"]
                .as_str()
                .map(String::from)
        };
        let default = resolved();
        assert_eq!(forwarder(&default).as_deref(), Some("relay"));
        let relay = &default["services"]["edge-relay"];
        assert!(
            relay["profiles"].is_badvalue(),
            "edge-relay runs by default"
        );
        let environment = &relay["environment"];
        assert_eq!(
            environment["CLOUD_PORT"].as_str(),
            Some("8883"),
            "TLS to the cloud"
        );
        assert_eq!(environment["CLOUD_TLS_CA"].as_str(), Some("/certs/ca.crt"));
        let volumes = volumes(&relay["volumes"]);
        assert!(
            volumes
                .iter()
                .any(|volume| volume.starts_with("relay-log:")),
            "the log on a volume: {volumes:?}"
        );

        let bridge = resolved_with(compose_files(&["compose.yaml", "compose.bridge.yaml"]));
        assert_eq!(forwarder(&bridge).as_deref(), Some("bridge"));
        let watcher = &bridge["services"]["edge-relay"];
        assert_eq!(watcher["image"].as_str(), Some("eclipse-mosquitto:2"));
        assert!(strings(&watcher["command"]).is_empty(), "no relay runs");
        let check = strings(&watcher["healthcheck"]["test"]).join(" ");
        // v2 prints `$$` as written, v1 as the `$` the shell gets.
        assert!(
            check
                .replace("$$", "$")
                .contains("$SYS/broker/connection/$BRIDGE_CLIENT_ID/state"),
            "{check}"
        );
        assert_eq!(
            watcher["environment"]["BRIDGE_CLIENT_ID"],
            bridge["services"]["mosquitto-local"]["environment"]["BRIDGE_CLIENT_ID"]
        );
    });
}

/// The networks of each service, by name.
fn networks(service: &Yaml) -> BTreeSet<String> {
    match &service["networks"] {
        Yaml::Hash(networks) => networks
            .keys()
            .filter_map(|name| name.as_str().map(String::from))
            .collect(),
        other => strings(other).into_iter().collect(),
    }
}

/// Two sites, as deployed: the edge's services on `edge`, the cloud's on `cloud`, and
/// only the forwarder on both (edge-relay; the edge broker with `compose.bridge.yaml`).
/// No broker and no database is on `metrics`, Prometheus's network.
#[test]
fn the_edge_and_the_cloud_are_two_networks_that_only_the_forwarder_joins() {
    with_each_compose(|| {
        for (files, forwarders) in [
            (&["compose.yaml"][..], &["edge-relay"][..]),
            (
                &["compose.yaml", "compose.bridge.yaml"],
                &["edge-relay", "mosquitto-local"],
            ),
            (&["compose.yaml", "compose.replicas.yaml"], &["edge-relay"]),
        ] {
            let config = resolved_with(compose_files(files));
            let mut on_both = Vec::new();
            for (name, service) in services(&config) {
                let networks = networks(&service);
                if name == "certs" {
                    assert_eq!(service["network_mode"].as_str(), Some("none"));
                    continue;
                }
                assert!(!networks.is_empty(), "{files:?}: {name} names no network");
                if networks.contains("edge") && networks.contains("cloud") {
                    on_both.push(name.clone());
                }
                if ["mosquitto-local", "mosquitto-cloud", "mongo"].contains(&name.as_str()) {
                    assert!(!networks.contains("metrics"), "{name} is on metrics");
                }
            }
            on_both.sort();
            assert_eq!(on_both, forwarders, "{files:?}");
        }
        let config = resolved();
        // The cloud broker's private key stays in the cloud: the edge site mounts the
        // CA's certificate alone.
        for (name, service) in services(&config) {
            let mounts_key = volumes(&service["volumes"])
                .iter()
                .any(|volume| volume.starts_with("certs:"));
            assert_eq!(
                mounts_key,
                ["certs", "mosquitto-cloud"].contains(&name.as_str()),
                "{name} and the certs volume"
            );
        }
        for edge in ["mosquitto-local", "edge-relay"] {
            assert!(
                volumes(&config["services"][edge]["volumes"])
                    .iter()
                    .any(|volume| volume.starts_with("ca:/certs:ro")),
                "{edge} lacks the CA's certificate"
            );
        }
        for edge in [
            "temperature-sensor",
            "pressure-sensor",
            "device-status",
            "mqtt-subscriber",
        ] {
            assert!(
                networks(&config["services"][edge]).contains("edge"),
                "{edge}"
            );
        }
        for cloud in ["mongo-persister", "mongo", "readings", "nodered"] {
            assert!(
                networks(&config["services"][cloud]).contains("cloud"),
                "{cloud}"
            );
        }
    });
}
