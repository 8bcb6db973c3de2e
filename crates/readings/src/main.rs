//! `readings` binary: parses the query, runs it, prints errors on one line.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let cli: readings::Cli =
        iot_core::config::load_with(readings::Cli::command(), std::env::args_os());
    if let Err(message) = cli.check() {
        iot_core::config::exit_bad_setting(&message);
    }
    iot_core::logging::init();
    // `gaps` answers like diff: 1 when it found some, 2 when it could not look.
    let is_gaps = matches!(cli.query, readings::Query::Gaps { .. });
    match readings::run(cli).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("error: {}", iot_store::describe(&error));
            ExitCode::from(if is_gaps { 2 } else { 1 })
        }
    }
}
