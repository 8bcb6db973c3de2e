//! `readings`: command-line queries over the stored readings.
//!
//! `latest`, `range`, `stats`, `devices`, `status`, `gaps` and `info`, printed as an
//! aligned table, JSON or CSV. A series is a topic, or a device and measurement.
//! Only standard MongoDB query and aggregation stages and operators are used, so it
//! runs against any MongoDB 6+ server and answers the same on nx-27017.
//!
//! [`cli`] is the command line, [`queries`] one function per query, [`gaps`] the
//! sequence check, [`ask`] its repair requests, [`output`] the three printed forms.

pub mod ask;
pub mod cli;
pub mod gaps;
pub mod output;
pub mod queries;

use std::io::Write;

use anyhow::Context;
use mongodb::Database;

pub use cli::{Cli, OutputFormat, Query};
pub use output::{print, Rows};

/// Runs the query and prints the result to stdout. `Ok(false)`: `gaps` found some.
pub async fn run(cli: Cli) -> anyhow::Result<bool> {
    let db = cli.mongo.database("readings").await?;
    let failed = || format!("query on {} failed", cli.mongo.redacted_uri());
    // `gaps --repair` asks again for what the one pass over the readings found.
    let (rows, found) = match &cli.query {
        Query::Gaps {
            since,
            device,
            settle,
            repair: true,
            ..
        } => {
            let (rows, found) = gaps::gaps(&db, *since, device.as_deref(), *settle)
                .await
                .with_context(failed)?;
            (rows, Some(found))
        }
        query_of_cli => (query(&db, query_of_cli).await.with_context(failed)?, None),
    };
    {
        let mut out = std::io::stdout().lock();
        print(&rows, cli.format, &mut out)?;
        out.flush().context("cannot write to stdout")?;
    }
    if let (Some(found), Query::Gaps { broker, .. }) = (found, &cli.query) {
        ask::ask_again(&found, broker, &db).await?;
    }
    Ok(!rows.trouble)
}

/// Runs one query.
pub async fn query(db: &Database, query: &Query) -> anyhow::Result<Rows> {
    match query {
        Query::Latest => queries::latest(db).await,
        Query::Range {
            series,
            window,
            limit,
        } => queries::range(db, series, window, *limit).await,
        Query::Stats {
            series,
            window,
            every,
        } => queries::stats(db, series, window, *every).await,
        Query::Devices => queries::devices(db).await,
        Query::Status => queries::status(db).await,
        Query::Info => queries::info(db).await,
        Query::Gaps {
            since,
            device,
            settle,
            ..
        } => Ok(gaps::gaps(db, *since, device.as_deref(), *settle).await?.0),
    }
}
