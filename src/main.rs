use clap::Parser;
use vault_registrar::cli::{Cli, Command, init_logging, run};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => {
            print!("{}", vault_registrar::crd_yaml());
            Ok(())
        }
        Command::Run(args) => {
            init_logging(args.log_format);
            run(*args).await
        }
    }
}
