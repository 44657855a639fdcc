//! Connection storm for `cargo xtask bench`: bounded connect/accept/close loops on one
//! address, printing the rate as one JSON line.
//!
//! usage: storm both|serve|connect ADDR CONNECTIONS [CLIENT_THREADS]
//!   both     server and clients in this process (one namespace, loopback): the server
//!            listens on 0.0.0.0:PORT and the clients spread over 127.0.0.1-127.0.0.16, so
//!            the TIME_WAIT entries of 100,000s of connections never exhaust a port range
//!   serve    accept CONNECTIONS, then exit (0: until killed)
//!   connect  make CONNECTIONS to a server elsewhere
//!
//! The server closes first (the TIME_WAIT state lands on the fixed server port, so client
//! ports are not exhausted); each client reads to EOF, then closes. Every connection is
//! counted on both sides; the run fails if any connect fails.

use std::{
    io::Read as _,
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 || !["both", "serve", "connect"].contains(&args[1].as_str()) {
        eprintln!("usage: storm both|serve|connect ADDR CONNECTIONS [CLIENT_THREADS]");
        std::process::exit(64);
    }
    let mode = args[1].as_str();
    let addr: SocketAddr = args[2].parse().expect("ADDR is ip:port");
    let total: u64 = args[3].parse().expect("CONNECTIONS is a number");
    let threads: u64 = args
        .get(4)
        .map_or(2, |t| t.parse().expect("CLIENT_THREADS"));

    let spread = mode == "both";
    let bind = if spread {
        SocketAddr::from(([0, 0, 0, 0], addr.port()))
    } else {
        addr
    };
    let server = (mode != "connect").then(|| serve(bind, total));
    if mode == "serve" {
        println!("listening");
        server.expect("server").join().expect("server thread");
        return;
    }
    let started = Instant::now();
    connect(addr, total, threads, spread);
    if let Some(server) = server {
        server.join().expect("server thread");
    }
    let seconds = started.elapsed().as_secs_f64();
    // CPU time of this process (both sides of every connection, and on loopback the
    // kernel's softirq work, eBPF programs included): steadier than wall time on a
    // shared machine.
    let cpu = cpu_seconds();
    println!(
        "{{\"connections\":{total},\"seconds\":{seconds:.6},\"per_second\":{:.0},\"cpu_seconds\":{cpu:.6},\"cpu_us_per_connection\":{:.3}}}",
        total as f64 / seconds,
        cpu * 1e6 / total as f64
    );
}

/// Accepts `total` connections, closing each at once.
fn serve(addr: SocketAddr, total: u64) -> std::thread::JoinHandle<()> {
    let listener = TcpListener::bind(addr).expect("bind");
    std::thread::spawn(move || {
        let total = if total == 0 { u64::MAX } else { total };
        for _ in 0..total {
            match listener.accept() {
                Ok((s, _)) => drop(s),
                Err(e) => panic!("accept: {e}"),
            }
        }
    })
}

/// `total` connections from `threads` threads; each reads to EOF (the server closes).
fn connect(addr: SocketAddr, total: u64, threads: u64, spread: bool) {
    let clients: Vec<_> = (0..threads)
        .map(|t| {
            let n = total / threads + u64::from(t < total % threads);
            std::thread::spawn(move || {
                let mut buf = [0u8; 16];
                for i in 0..n {
                    let mut to = addr;
                    if spread {
                        to.set_ip(std::net::Ipv4Addr::new(127, 0, 0, 1 + (i % 16) as u8).into());
                    }
                    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))
                        .unwrap_or_else(|e| panic!("connect {to}: {e}"));
                    let _ = s.read(&mut buf);
                }
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client thread");
    }
}

/// User + system CPU time of this process so far.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes one rusage struct into the pointer it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}
