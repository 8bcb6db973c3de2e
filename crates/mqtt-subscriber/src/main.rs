//! `mqtt-subscriber` binary: loads the configuration and runs [`mqtt_subscriber::run`].

use std::process::ExitCode;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let config: mqtt_subscriber::Config = iot_core::config::load();
    iot_core::logging::init();
    let shutdown = iot_core::shutdown::on_signal();
    iot_core::exit_code(mqtt_subscriber::run(config, shutdown).await)
}
