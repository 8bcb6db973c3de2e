//! Tracing set-up shared by every binary: human-readable lines on stderr (stdout is
//! kept for data), filtered by `RUST_LOG` (default `info`).

use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. An unparsable `RUST_LOG` falls back to `info` and
/// says so instead of silencing the logs.
pub fn init() {
    let (filter, bad_filter) = match std::env::var("RUST_LOG") {
        Ok(value) if !value.trim().is_empty() => match EnvFilter::try_new(&value) {
            Ok(filter) => (filter, None),
            Err(error) => (EnvFilter::new("info"), Some((value, error))),
        },
        _ => (EnvFilter::new("info"), None),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if let Some((value, error)) = bad_filter {
        tracing::warn!("ignoring RUST_LOG={value:?} ({error}); logging at info");
    }
}
