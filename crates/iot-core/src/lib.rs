//! Shared library of the telemetry pipeline.
//!
//! Everything the binaries have in common lives here once: broker settings and the
//! MQTT connection that keeps itself alive ([`config`], [`mqtt`]), the payload codec
//! ([`payload`]), topic names ([`topics`]), the shutdown signal ([`shutdown`]),
//! tracing set-up ([`logging`]), and the simulated sensor service that the
//! `temperature-sensor` and `pressure-sensor` binaries run ([`sensor`]) with its
//! fleets of devices ([`fleet`]); with the
//! `store` feature, the MongoDB schema and settings (`store`).

pub mod backoff;
pub mod config;
pub mod fleet;
pub mod logging;
pub mod mqtt;
pub mod payload;
pub mod sensor;
pub mod shutdown;
#[cfg(feature = "store")]
pub mod store;
pub mod topics;

use std::process::ExitCode;

/// Turns the outcome of a service's `run` into the process exit code, logging the
/// error chain of a failure on one line.
pub fn exit_code(outcome: anyhow::Result<()>) -> ExitCode {
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}
