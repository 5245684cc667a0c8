use clap::Parser;
use vault_registrar::cli::{Cli, Command, init_logging, run};

/// mimalloc returns freed memory to the system where glibc's per-thread arenas keep it:
/// the initial lists of a large namespace would otherwise stay in the RSS for good.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    no_huge_pages();
    operator()
}

/// mimalloc asks for transparent huge pages, and a 2 MiB page stays resident while any of
/// it is in use: memory freed after a burst of large watch events (pods with hundreds of
/// kilobytes of labels) then stays in the RSS, 2 MiB at a time. The operator's heap is
/// small and its speed does not hang on TLB misses, so it takes none. Best effort: without
/// it only the RSS is larger.
fn no_huge_pages() {
    // SAFETY: prctl with PR_SET_THP_DISABLE reads no pointer and only sets a process flag.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

#[tokio::main]
async fn operator() -> anyhow::Result<()> {
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
