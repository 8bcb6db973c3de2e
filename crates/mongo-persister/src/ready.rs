//! When the persister is ready: every subscription granted (the `subscribed` health
//! check and the `--ready-file`).

use anyhow::Context;
use rumqttc::SubscribeReasonCode;

/// The persister's readiness check on its subscriptions.
pub const SUBSCRIBED_CHECK: &str = "subscribed";

/// Logs each filter's answer; true when the broker granted all of them.
pub fn report_subscription(filters: &[String], codes: &[SubscribeReasonCode]) -> bool {
    let mut all = codes.len() == filters.len();
    for (filter, code) in filters.iter().zip(codes) {
        match code {
            SubscribeReasonCode::Success(_) => tracing::info!(filter, "subscribed"),
            SubscribeReasonCode::Failure => {
                all = false;
                tracing::error!(
                    filter,
                    "the broker refused the subscription (check the ACL for this user)"
                )
            }
        }
    }
    all
}

/// The `--ready-file`: absent until the subscriptions stand, removed again on exit.
#[derive(Debug)]
pub struct ReadyFile {
    path: Option<std::path::PathBuf>,
    marked: bool,
}

impl ReadyFile {
    /// Removes a file left by an earlier run that did not end cleanly.
    pub fn new(path: Option<std::path::PathBuf>) -> anyhow::Result<Self> {
        if let Some(path) = &path {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    return Err(error).with_context(|| {
                        format!("cannot remove the old ready file {}", path.display())
                    })
                }
            }
        }
        Ok(Self {
            path,
            marked: false,
        })
    }

    pub fn mark(&mut self) -> anyhow::Result<()> {
        if let (Some(path), false) = (&self.path, self.marked) {
            std::fs::write(path, b"subscribed\n").with_context(|| {
                format!(
                    "cannot write the ready file {} (PERSISTER_READY_FILE)",
                    path.display()
                )
            })?;
            tracing::info!(file = %path.display(), "ready: every subscription stands");
            self.marked = true;
        }
        Ok(())
    }

    pub fn clear(&self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }
}
