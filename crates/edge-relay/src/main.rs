//! `edge-relay` binary: loads the configuration and runs [`edge_relay::run`].

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let config: edge_relay::Config = iot_core::config::load();
    if let Err(message) = config.validate() {
        iot_core::config::exit_bad_setting(&message);
    }
    iot_core::logging::init();
    let shutdown = iot_core::shutdown::on_signal();
    iot_core::exit_code(edge_relay::run(config, shutdown).await)
}
