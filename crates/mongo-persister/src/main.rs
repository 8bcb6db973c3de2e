//! `mongo-persister` binary: loads the configuration and runs [`mongo_persister::run`].

use std::process::ExitCode;

/// Every reading is a few short-lived allocations (its document, its BSON, its batch);
/// mimalloc serves them for about a third of glibc's cost (`bench/profile.sh`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let config: mongo_persister::Config = iot_core::config::load();
    if let Err(message) = config.validate() {
        iot_core::config::exit_bad_setting(&message);
    }
    iot_core::logging::init();
    let shutdown = iot_core::shutdown::on_signal();
    iot_core::exit_code(mongo_persister::run(config, shutdown).await)
}
