//! The native stack (`scripts/dev-stack --dashboard`): from a fresh state to readings
//! in the database that `readings latest` shows and a dashboard connected to the cloud
//! broker, a second start refused while it runs, and a clean stop on Ctrl-C.

use tests::dashboard::http;
use tests::{binary, cargo_package_variables, free_port, repo_root, wait_for, Service};

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

fn stack(dir: &std::path::Path, ports: &[(&str, u16)]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(repo_root().join("scripts/dev-stack"));
    command
        .arg("--dashboard")
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
    binary("readings"); // builds the debug binaries the stack runs
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = [
        ("LOCAL_PORT", free_port()),
        ("CLOUD_PORT", free_port()),
        ("CLOUD_TLS_PORT", free_port()),
        ("MONGO_PORT", free_port()),
        ("NODERED_PORT", free_port()),
    ];
    let uri = format!("mongodb://127.0.0.1:{}", ports[3].1);
    let mut running = Service::spawn("dev-stack", stack(dir.path(), &ports));

    let stored = wait_for(
        "both sensors' readings in the database",
        || async { latest(&uri) },
        |out| out.contains("/sensor/temperature") && out.contains("/sensor/pressure"),
    )
    .await;
    assert!(stored.contains("temp-0001"), "{stored}");
    // The dashboard logged in to the cloud broker with the password from the env file,
    // and serves its page.
    running.wait_for_stdout("Connected to broker").await;
    let (status, page) = http(ports[4].1, "GET", "/dashboard/", &[], None).await;
    assert_eq!(status, 200, "{page}");
    assert!(
        dir.path().join("env").is_file(),
        "no env file made from .env.example"
    );

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
