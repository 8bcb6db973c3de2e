//! Shared library of the telemetry pipeline.
//!
//! What every service uses lives here once: broker settings and the MQTT connection
//! that keeps itself alive ([`config`], [`mqtt`], [`backoff`]), the payload codec
//! ([`payload`]), topic names ([`topics`]), the shutdown signal ([`shutdown`]),
//! tracing set-up ([`logging`]), metrics and health checks ([`ops`]), the NATS JetStream
//! cloud tier's shared pieces ([`nats`]), the replay protocol ([`replay`]) and the bounds on what a device sends ([`bounds`]). The
//! MongoDB side is the `iot-store` crate, the simulated devices the `sensor-sim` crate.

pub mod backoff;
pub mod bounds;
pub mod config;
pub mod logging;
pub mod mqtt;
pub mod nats;
pub mod ops;
pub mod payload;
pub mod replay;
pub mod shutdown;
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
