use clap::Parser;
use vault_registrar::cli::{Cli, Command, init_logging, run};

/// mimalloc returns freed memory to the system where glibc's per-thread arenas keep it:
/// the initial lists of a large namespace would otherwise stay in the RSS for good.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
