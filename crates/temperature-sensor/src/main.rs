//! `temperature-sensor`: publishes simulated temperature readings to the edge broker.
//!
//! All of the work is in [`sensor_sim::sensor`], shared with the other sensor binary.

use std::process::ExitCode;

use sensor_sim::sensor::{self, SensorConfig};

#[tokio::main]
async fn main() -> ExitCode {
    let config = SensorConfig::load(&sensor::TEMPERATURE);
    iot_core::logging::init();
    let shutdown = iot_core::shutdown::on_signal();
    iot_core::exit_code(sensor::run(&sensor::TEMPERATURE, config, shutdown).await)
}
