//! `device-status` binary: loads the configuration and runs [`device_status::run`].

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let config: device_status::Config = iot_core::config::load();
    if let Err(message) = config.validate() {
        iot_core::config::exit_bad_setting(&message);
    }
    iot_core::logging::init();
    let shutdown = iot_core::shutdown::on_signal();
    iot_core::exit_code(device_status::run(config, shutdown).await)
}
