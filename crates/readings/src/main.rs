//! `readings` binary: parses the query, runs it, prints errors on one line.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let cli: readings::Cli =
        iot_core::config::load_with(readings::Cli::command(), std::env::args_os());
    iot_core::logging::init();
    match readings::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", iot_core::store::describe(&error));
            ExitCode::FAILURE
        }
    }
}
