//! `--features heap-count`: mimalloc, with the bytes the program holds counted, so that
//! the RSS can be told apart into what the heap holds and what the allocator keeps around
//! it (partly used pages). Every 10 s the count is appended to the file
//! `VAULT_REGISTRAR_HEAP_COUNT_FILE` names (default `heap-count.txt`): seconds since the
//! start, bytes held, allocations held, and the bytes held in allocations of each size
//! class (powers of two up to 1 MiB, then larger).

use std::alloc::{GlobalAlloc, Layout};
use std::io::Write;
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};

pub struct Counting;

const CLASSES: usize = 22;
static BYTES: AtomicI64 = AtomicI64::new(0);
static COUNT: AtomicI64 = AtomicI64::new(0);
static BY_CLASS: [AtomicI64; CLASSES] = [const { AtomicI64::new(0) }; CLASSES];

fn class(size: usize) -> usize {
    (usize::BITS - size.max(1).leading_zeros()) as usize - 1
}

fn count(size: usize, sign: i64) {
    let bytes = sign * size as i64;
    BYTES.fetch_add(bytes, Relaxed);
    COUNT.fetch_add(sign, Relaxed);
    BY_CLASS[class(size).min(CLASSES - 1)].fetch_add(bytes, Relaxed);
}

// SAFETY: every call is passed on to mimalloc unchanged; the counters only observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size(), 1);
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size(), 1);
        unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(layout.size(), -1);
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(layout.size(), -1);
        count(new_size, 1);
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
    }
}

/// Appends the counts to the file every 10 s, from a thread of its own.
pub fn report() {
    let file = std::env::var("VAULT_REGISTRAR_HEAP_COUNT_FILE").unwrap_or("heap-count.txt".into());
    let start = std::time::Instant::now();
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(10));
            let classes: Vec<String> = BY_CLASS
                .iter()
                .enumerate()
                .map(|(c, b)| format!("{}:{}", 1u64 << c, b.load(Relaxed)))
                .collect();
            let line = format!(
                "{} {} {} {}\n",
                start.elapsed().as_secs(),
                BYTES.load(Relaxed),
                COUNT.load(Relaxed),
                classes.join(" ")
            );
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&file)
            {
                let _ = f.write_all(line.as_bytes());
            }
        }
    });
}
