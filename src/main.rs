use clap::Parser;
use vault_registrar::cli::{Cli, Command, init_logging, run};

/// mimalloc returns freed memory to the system where glibc's per-thread arenas keep it:
/// the initial lists of a large namespace would otherwise stay in the RSS for good.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd { chart_template } => {
            let yaml = vault_registrar::crd_yaml();
            match chart_template {
                false => print!("{yaml}"),
                true => print!("{}", vault_registrar::crd_chart_template(&yaml)),
            }
            Ok(())
        }
        Command::Run(args) => {
            init_logging(args.log_format, &args.log_level);
            run(*args).await
        }
    }
}
