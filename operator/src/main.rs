//! `sharddb-operator`: runs a ShardedDatabase locally (`local`) or prints the CRD (`crd`).

use anyhow::Context;
use clap::{Parser, Subcommand};
use operator::local::{LocalOptions, run_local};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "sharddb-operator", version, about = "The sharddb control plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a ShardedDatabase on this machine: one throwaway Postgres and one shard server per
    /// server, and a router. Prints the router URL; stops everything on Ctrl-C or SIGTERM.
    Local {
        /// The ShardedDatabase resource (YAML, as given to kubectl apply).
        spec: PathBuf,
        /// Where data, logs, topology.json and cluster.json go; a new temporary directory (kept)
        /// when absent. An existing directory's data is reused.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The router's port on 127.0.0.1; 0 picks a free one.
        #[arg(long, default_value_t = 5000)]
        port: u16,
        /// Directory holding sharddb-shard-server and sharddb-router; default: this program's own.
        #[arg(long, env = "SHARDDB_BIN_DIR")]
        bin_dir: Option<PathBuf>,
        /// Directory holding the PostgreSQL binaries (initdb, pg_ctl); default: initdb on PATH, else
        /// the newest /usr/lib/postgresql/*/bin.
        #[arg(long, env = "SHARDDB_PG_BIN")]
        pg_bin: Option<PathBuf>,
    },
    /// Print the ShardedDatabase CustomResourceDefinition as YAML.
    Crd,
}

fn main() -> ExitCode {
    shard_server::api::install_crypto_provider();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Crd => {
            print!("{}", operator::crd::crd_yaml().context("failed to render the CRD")?);
            Ok(())
        }
        Command::Local { spec, data_dir, port, bin_dir, pg_bin } => {
            let bin_dir = match bin_dir {
                Some(d) => d,
                None => std::env::current_exe()
                    .context("cannot find this program's path; pass --bin-dir")?
                    .parent()
                    .context("this program has no directory; pass --bin-dir")?
                    .to_owned(),
            };
            let opts = LocalOptions { spec, data_dir, port, bin_dir, pg_bin };
            let runtime = tokio::runtime::Runtime::new().context("failed to start the async runtime")?;
            runtime.block_on(run_local(opts))?;
            Ok(())
        }
    }
}
