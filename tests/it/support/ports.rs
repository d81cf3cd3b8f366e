//! Ports for the servers a test starts itself (Redis, PostgreSQL) or starts
//! again on the same port (an Iris that is killed and restarted): free now,
//! and below the kernel's ephemeral range (32768 and up by default), so
//! that no outgoing connection of a busy test run can take one as its
//! source port between the pick and the server's bind. A port 0 bind picks
//! from that very range, which is what made such servers fail to start now
//! and then under load.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// Where the picks start: 20000 to 29999, by process, so that processes
/// started together (the test binary, the soak) rarely try the same ones.
const FIRST: u32 = 20_000;
const SPAN: u32 = 10_000;

/// A loopback port nobody listens on now, outside the ephemeral range.
pub fn listen_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let offset = std::process::id().wrapping_mul(7919) % SPAN;
    for _ in 0..SPAN {
        let step = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = FIRST + (offset + step) % SPAN;
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {FIRST}..{}", FIRST + SPAN);
}
