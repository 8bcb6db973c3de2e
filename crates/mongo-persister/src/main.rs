//! `mongo-persister` binary: loads the configuration and runs [`mongo_persister::run`].

use std::process::ExitCode;

/// Every reading is a few short-lived allocations (its document, its BSON, its batch);
/// mimalloc serves them for about a third of glibc's cost (`bench/profile.sh`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

// One thread: a reading costs microseconds and the database decides the pace, so
// waking a second thread for each hand-over cost more than it gave (bench/peers.sh:
// 28 → 22 µs per reading, peak memory 65 → 37 MiB, wall 5 % shorter).
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let config: mongo_persister::Config = iot_core::config::load();
    if let Err(message) = config.validate() {
        iot_core::config::exit_bad_setting(&message);
    }
    iot_core::logging::init();
    let shutdown = iot_core::shutdown::on_signal();
    iot_core::exit_code(mongo_persister::run(config, shutdown).await)
}
