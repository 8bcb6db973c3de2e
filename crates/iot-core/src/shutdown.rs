//! The shutdown signal: Ctrl-C (SIGINT) or SIGTERM (what `docker stop` sends).
//!
//! Services take a [`CancellationToken`] in `run` and finish cleanly when it is
//! cancelled; a second signal ends the process at once.

use tokio_util::sync::CancellationToken;

/// Returns a token that is cancelled on the first SIGINT or SIGTERM. A second signal
/// exits immediately with status 130, for a stop that hangs on an unreachable broker.
///
/// The handlers are installed before this returns, not when the waiting task first
/// runs: on a current-thread runtime that is only once `run` first waits, and a signal
/// before that would end the process without a clean stop.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    let mut signals = Signals::listen();
    tokio::spawn(async move {
        let name = signals.next().await;
        tracing::info!("received {name}, shutting down (send it again to exit at once)");
        trigger.cancel();
        let name = signals.next().await;
        tracing::warn!("received {name} again, exiting now");
        std::process::exit(130);
    });
    token
}

/// SIGINT and SIGTERM, listened to from creation on.
#[cfg(unix)]
struct Signals {
    interrupt: Option<tokio::signal::unix::Signal>,
    terminate: Option<tokio::signal::unix::Signal>,
}

#[cfg(unix)]
impl Signals {
    fn listen() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        let listen = |kind, name| match signal(kind) {
            Ok(listener) => Some(listener),
            Err(error) => {
                tracing::warn!(
                    "cannot listen for {name} ({error}); it will not stop the service cleanly"
                );
                None
            }
        };
        Self {
            interrupt: listen(SignalKind::interrupt(), "SIGINT"),
            terminate: listen(SignalKind::terminate(), "SIGTERM"),
        }
    }

    async fn next(&mut self) -> &'static str {
        async fn received(listener: &mut Option<tokio::signal::unix::Signal>) {
            match listener {
                Some(listener) => {
                    listener.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            () = received(&mut self.interrupt) => "SIGINT",
            () = received(&mut self.terminate) => "SIGTERM",
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn listen() -> Self {
        Self
    }

    async fn next(&mut self) -> &'static str {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    }
}
