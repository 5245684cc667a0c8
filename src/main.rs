use clap::Parser;
use vault_registrar::cli::{Cli, Command, init_logging, run};

/// mimalloc returns freed memory to the system where glibc's per-thread arenas keep it:
/// the initial lists of a large namespace would otherwise stay in the RSS for good. With
/// `--features system-allocator` Rust allocates through the C library's `malloc` instead, so
/// that a sampling heap profiler preloaded in its place sees every allocation (jemalloc's:
/// `LD_PRELOAD=libjemalloc.so.2 MALLOC_CONF=prof:true,...`), at a cost the steady state of
/// 1,000 clusters bears, where dhat's full backtraces do not.
#[cfg(not(any(
    feature = "dhat-heap",
    feature = "system-allocator",
    feature = "heap-count"
)))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(feature = "heap-count")]
mod heap_count;

/// With `--features heap-count`, mimalloc with the bytes held counted (see `heap_count`).
#[cfg(feature = "heap-count")]
#[global_allocator]
static ALLOCATOR: heap_count::Counting = heap_count::Counting;

/// With `--features dhat-heap`, every allocation is recorded by dhat instead (see
/// `heap_profile`).
#[cfg(feature = "dhat-heap")]
#[global_allocator]
static ALLOCATOR: dhat::Alloc = dhat::Alloc;

fn main() -> anyhow::Result<()> {
    no_huge_pages();
    #[cfg(not(any(feature = "dhat-heap", feature = "system-allocator")))]
    purge_at_once();
    #[cfg(feature = "dhat-heap")]
    let _profile = heap_profile();
    #[cfg(feature = "heap-count")]
    heap_count::report();
    let cli = Cli::parse();
    let threads = match &cli.command {
        Command::Run(args) => usize::from(args.worker_threads),
        Command::Crd { .. } => 1,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    // The operator runs as a task, on the workers. Polled by `block_on` it would run on this
    // thread, beside them, and each wake-up between the two costs a system call: at 1,000
    // clusters this thread spent half its time waking the worker (12 % of the operator's
    // CPU in a `perf` profile).
    runtime.block_on(async { tokio::spawn(operator(cli)).await? })
}

/// Starts dhat's heap profile, which is written when the profiler is dropped: at exit, or,
/// with `VAULT_REGISTRAR_DHAT_SECONDS`, that many seconds after the start if the operator
/// still runs, so that its "at end" figures are the steady state and not what is left once
/// the shutdown freed the caches. `VAULT_REGISTRAR_DHAT_FILE` names the file (default
/// `dhat-heap.json`).
#[cfg(feature = "dhat-heap")]
fn heap_profile() -> HeapProfile {
    static PROFILER: std::sync::Mutex<Option<dhat::Profiler>> = std::sync::Mutex::new(None);
    let file = std::env::var("VAULT_REGISTRAR_DHAT_FILE").unwrap_or("dhat-heap.json".into());
    // Deep enough to get past serde and hyper to the operator's own frames.
    let profiler = dhat::Profiler::builder()
        .file_name(file)
        .trim_backtraces(Some(32))
        .build();
    *PROFILER.lock().unwrap() = Some(profiler);
    if let Some(after) = std::env::var("VAULT_REGISTRAR_DHAT_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs(after));
            PROFILER.lock().unwrap().take();
        });
    }
    // SIGUSR1 writes the profile too, so a bench can take it at its steady state.
    // SAFETY: the mask is set before any other thread starts, so all inherit it, and only
    // the thread below takes the signal, with sigwait.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        std::thread::spawn(move || {
            let mut signal = 0;
            libc::sigwait(&set, &mut signal);
            PROFILER.lock().unwrap().take();
        });
    }
    HeapProfile(&PROFILER)
}

/// Writes the profile at exit, unless it was written already.
#[cfg(feature = "dhat-heap")]
struct HeapProfile(&'static std::sync::Mutex<Option<dhat::Profiler>>);

#[cfg(feature = "dhat-heap")]
impl Drop for HeapProfile {
    fn drop(&mut self) {
        self.0.lock().unwrap().take();
    }
}

// mimalloc's own setter (mimalloc.h), linked in with the allocator.
#[cfg(not(any(feature = "dhat-heap", feature = "system-allocator")))]
unsafe extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// `mi_option_purge_delay` in mimalloc.h's `mi_option_e` (v2 and v3 alike).
#[cfg(not(any(feature = "dhat-heap", feature = "system-allocator")))]
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// mimalloc gives freed pages back to the system only after a delay, and only when the
/// heap that freed them allocates again: after a start beside pods with hundreds of
/// kilobytes of labels (a list page of tens of megabytes, parsed, then slimmed) an idle
/// watch thread kept about 100 MiB resident for good. Purged at once, the RSS comes back
/// to what the caches hold.
#[cfg(not(any(feature = "dhat-heap", feature = "system-allocator")))]
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

async fn operator(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
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
