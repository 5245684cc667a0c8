use clap::Parser;
use vault_registrar::cli::{Cli, Command, init_logging, run};

/// mimalloc returns freed memory to the system where glibc's per-thread arenas keep it:
/// the initial lists of a large namespace would otherwise stay in the RSS for good.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    no_huge_pages();
    purge_at_once();
    operator()
}

// mimalloc's own setter (mimalloc.h), linked in with the allocator.
unsafe extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// `mi_option_purge_delay` in mimalloc.h's `mi_option_e` (v2 and v3 alike).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// mimalloc gives freed pages back to the system only after a delay, and only when the
/// heap that freed them allocates again: after a start beside pods with hundreds of
/// kilobytes of labels (a list page of tens of megabytes, parsed, then slimmed) an idle
/// watch thread kept about 100 MiB resident for good. Purged at once, the RSS comes back
/// to what the caches hold.
fn purge_at_once() {
    // SAFETY: sets one integer option before any other thread runs; the index is checked
    // against the header of the mimalloc version the lock file pins.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
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
