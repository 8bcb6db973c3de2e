//! `edge-relay` binary: loads the configuration and runs [`edge_relay::run`].

use std::process::ExitCode;

/// mimalloc gives back to the system what a burst of large messages passed through:
/// glibc kept it in its arenas (612 MiB still held after 1 GB of 2 MB messages were
/// forwarded, against 55 MiB at start; about half that with mimalloc).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let config: edge_relay::Config = iot_core::config::load();
    if let Err(message) = config.validate() {
        iot_core::config::exit_bad_setting(&message);
    }
    iot_core::logging::init();
    let shutdown = iot_core::shutdown::on_signal();
    match edge_relay::run(config, shutdown).await {
        // Another relay's log: a setting to change, not a failure to restart on.
        Err(error) if error.downcast_ref::<edge_relay::log::Held>().is_some() => {
            tracing::error!("{error:#}");
            ExitCode::from(2)
        }
        outcome => iot_core::exit_code(outcome),
    }
}
