//! The Node-RED dashboard of `nodered/` for the end-to-end tests: Node-RED started with
//! the project's settings and flows against a test's cloud broker, and a headless
//! Chromium (Debian's, driven by `nodered/browser.mjs` through playwright-core) that
//! reads what the page shows.

use std::path::Path;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::{free_port, password, repo_root, Brokers, Service, WAIT};

/// Where Debian's chromium package puts the browser.
const CHROMIUM: &str = "/usr/bin/chromium";

/// Installs Node-RED and the dashboard nodes at their pinned versions with
/// `nodered/install.sh` (a no-op when they are), once per test process.
pub fn install_node_red() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let status = std::process::Command::new(repo_root().join("nodered/install.sh"))
            .status()
            .expect("cannot run nodered/install.sh");
        assert!(status.success(), "nodered/install.sh failed: {status}");
    });
}

/// A running Node-RED with the project's flows, reading a test's cloud broker.
#[derive(Debug)]
pub struct NodeRed {
    pub port: u16,
    pub service: Service,
    _user_dir: TempDir,
}

impl NodeRed {
    /// The dashboard's address.
    pub fn dashboard_url(&self) -> String {
        format!("http://127.0.0.1:{}/dashboard", self.port)
    }
}

/// Starts Node-RED with `nodered/settings.js` and `nodered/flows.json`, logged in to
/// the cloud broker as the `dashboard` user, with the editor's `admin` password when
/// given, and waits until it listens and its flows are connected.
pub async fn spawn_node_red(brokers: &Brokers, admin_password: Option<&str>) -> NodeRed {
    install_node_red();
    let mut last_log = String::new();
    for _ in 0..5 {
        let port = free_port();
        let user_dir = tempfile::tempdir().expect("tempdir");
        let nodered = repo_root().join("nodered");
        let mut command = Command::new(nodered.join("node_modules/.bin/node-red"));
        command
            .arg("--settings")
            .arg(nodered.join("settings.js"))
            .arg("--userDir")
            .arg(user_dir.path())
            .current_dir(user_dir.path())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", user_dir.path())
            .env("CLOUD_BROKER", "127.0.0.1")
            .env("CLOUD_PORT", brokers.cloud.port.to_string())
            .env("DASHBOARD_PASSWORD", password("dashboard"))
            .env("NODERED_PORT", port.to_string());
        if let Some(admin_password) = admin_password {
            command.env("NODERED_ADMIN_PASSWORD", admin_password);
        }
        let mut service = Service::spawn("node-red", command);
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            // Node-RED logs to stdout.
            let log = service.stdout_lines();
            let logged = |needle: &str| log.iter().any(|line| line.contains(needle));
            if logged("Unable to listen on") {
                // The port was taken meanwhile (Node-RED then runs on without a
                // server): try another.
                last_log = log.join("\n");
                service.kill().await;
                break;
            }
            if logged("Server now running at") && logged("Connected to broker") {
                return NodeRed {
                    port,
                    service,
                    _user_dir: user_dir,
                };
            }
            assert!(
                service.is_running(),
                "Node-RED exited; it logged:\n{}\n{}",
                log.join("\n"),
                service.stderr()
            );
            assert!(
                tokio::time::Instant::now() < deadline,
                "Node-RED did not connect to the cloud broker; it logged:\n{}\n{}",
                service.stdout_lines().join("\n"),
                service.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    panic!("Node-RED did not start:\n{last_log}");
}

/// Sends one HTTP/1.1 request to 127.0.0.1:`port`, with `headers` (`Name: value`
/// lines) and a form `body` when given, and returns the status code and the body.
pub async fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[&str],
    body: Option<&str>,
) -> (u16, String) {
    use tokio::io::AsyncReadExt;
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap_or_else(|error| panic!("nothing listens on port {port}: {error}"));
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for header in headers {
        request.push_str(&format!("{header}\r\n"));
    }
    if let Some(body) = body {
        request.push_str(&format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    } else {
        request.push_str("\r\n");
    }
    stream.write_all(request.as_bytes()).await.expect("request");
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
        .await
        .expect("no answer")
        .expect("answer");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not HTTP: {answer}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A headless Chromium showing one page at a time.
#[derive(Debug)]
pub struct Browser {
    /// Held so the browser lives as long as this (killed on drop).
    _child: Child,
    stdin: ChildStdin,
    answers: Lines<BufReader<ChildStdout>>,
}

impl Browser {
    /// Starts Debian's Chromium, headless, through `nodered/browser.mjs`.
    pub fn launch() -> Browser {
        install_node_red();
        assert!(
            Path::new(CHROMIUM).exists(),
            "{CHROMIUM} not found: install Debian's chromium package (scripts/test does)"
        );
        let mut child = Command::new("node")
            .arg(repo_root().join("nodered/browser.mjs"))
            .env("CHROMIUM", CHROMIUM)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("cannot start node (nodered/install.sh installs it)");
        let stdin = child.stdin.take().expect("browser stdin");
        let answers = BufReader::new(child.stdout.take().expect("browser stdout")).lines();
        Browser {
            _child: child,
            stdin,
            answers,
        }
    }

    /// Sends one command and returns its answer; panics when the browser says it failed.
    async fn ask(&mut self, command: Value) -> Value {
        let line = format!("{command}\n");
        self.stdin
            .write_all(line.as_bytes())
            .await
            .expect("the browser driver stopped");
        let answer = tokio::time::timeout(WAIT * 2, self.answers.next_line())
            .await
            .unwrap_or_else(|_| panic!("the browser did not answer {command}"))
            .expect("cannot read the browser's answer")
            .unwrap_or_else(|| panic!("the browser driver exited on {command}"));
        let answer: Value = serde_json::from_str(&answer)
            .unwrap_or_else(|error| panic!("not JSON from the browser ({error}): {answer}"));
        assert!(
            answer["ok"] == true,
            "the browser failed on {command}: {}\nthe page showed:\n{}",
            answer["error"],
            answer["texts"][0].as_str().unwrap_or("")
        );
        answer
    }

    /// Loads `url`.
    pub async fn open(&mut self, url: &str) {
        self.ask(json!({ "open": url })).await;
    }

    /// Waits until an element matching the CSS `selector` shows `text`, and returns
    /// all that element shows.
    pub async fn wait_for_text(&mut self, selector: &str, text: &str) -> String {
        let answer = self
            .ask(json!({
                "wait_text": selector,
                "text": text,
                "timeout_ms": WAIT.as_millis() as u64,
            }))
            .await;
        answer["text"].as_str().unwrap_or_default().to_string()
    }

    /// Writes a PNG of the whole page to `path`.
    pub async fn screenshot(&mut self, path: &Path) {
        self.ask(json!({ "screenshot": path })).await;
    }
}
