//! Threads parked in `accept()`, as a busy server (or an attacker in any pod) would park
//! them: `acceptors ADDR:PORT COUNT` binds a listener and starts COUNT threads, each
//! blocked in `accept()` on it; prints `parked COUNT` once every thread is about to block,
//! then waits until it is killed. Each blocked call holds one instance of a kretprobe on
//! `inet_csk_accept`, so a count above its pool exhausts it. Bounded: at most 20,000
//! threads of 64 KiB stacks; the wait for them to start at most 120 s. For tests only,
//! in network namespaces or VMs the test created.

use std::{
    net::TcpListener,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

const MAX_THREADS: usize = 20_000;

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(addr), Some(count)) = (args.next(), args.next()) else {
        eprintln!("usage: acceptors ADDR:PORT COUNT");
        std::process::exit(64);
    };
    let count: usize = match count.parse() {
        Ok(n) if n <= MAX_THREADS => n,
        _ => {
            eprintln!("COUNT must be a number up to {MAX_THREADS}");
            std::process::exit(64);
        }
    };
    // accept() takes its descriptor before it blocks: each parked call holds one.
    raise_open_files(count as u64 + 64);
    let listener = Arc::new(TcpListener::bind(&addr).unwrap_or_else(|e| {
        eprintln!("bind {addr}: {e}");
        std::process::exit(1);
    }));
    let started = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    for _ in 0..count {
        let (mine, counter, failures) = (
            Arc::clone(&listener),
            Arc::clone(&started),
            Arc::clone(&failed),
        );
        let spawned = std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || {
                counter.fetch_add(1, Ordering::SeqCst);
                // Blocks until a connection comes (none does) or the process ends.
                if let Err(e) = mine.accept() {
                    if failures.fetch_add(1, Ordering::SeqCst) == 0 {
                        eprintln!("accept: {e}");
                    }
                }
            });
        if let Err(e) = spawned {
            eprintln!("thread {}: {e}", started.load(Ordering::SeqCst));
            std::process::exit(1);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while started.load(Ordering::SeqCst) < count && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Each thread counted itself just before its accept(): give the last ones a moment
    // to get there.
    std::thread::sleep(Duration::from_millis(500));
    let parked = started.load(Ordering::SeqCst) - failed.load(Ordering::SeqCst);
    println!("parked {parked}");
    if parked < count {
        std::process::exit(1);
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Raises the soft and hard limits on open files to at least `n` (root may).
fn raise_open_files(n: u64) {
    let limit = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: a plain struct passed by pointer to setrlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        eprintln!(
            "cannot raise the open-file limit to {n}: {}",
            std::io::Error::last_os_error()
        );
        std::process::exit(1);
    }
}
