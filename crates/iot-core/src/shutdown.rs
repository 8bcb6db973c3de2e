//! The shutdown signal: Ctrl-C (SIGINT) or SIGTERM (what `docker stop` sends).
//!
//! Services take a [`CancellationToken`] in `run` and finish cleanly when it is
//! cancelled; a second signal ends the process at once.

use tokio_util::sync::CancellationToken;

/// Returns a token that is cancelled on the first SIGINT or SIGTERM. A second signal
/// exits immediately with status 130, for a stop that hangs on an unreachable broker.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let name = wait_for_signal().await;
        tracing::info!("received {name}, shutting down (send it again to exit at once)");
        trigger.cancel();
        let name = wait_for_signal().await;
        tracing::warn!("received {name} again, exiting now");
        std::process::exit(130);
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = tokio::signal::ctrl_c() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        Err(error) => {
            tracing::warn!("cannot listen for SIGTERM ({error}); only Ctrl-C stops cleanly");
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() -> &'static str {
    let _ = tokio::signal::ctrl_c().await;
    "Ctrl-C"
}
