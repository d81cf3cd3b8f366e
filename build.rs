//! Builds the o200k tokenizer's tables for `src/budget/o200k.rs` from the
//! vocabulary in `assets/o200k_base.tiktoken` (OpenAI's, as tiktoken
//! publishes it: a token's bytes in base64 and its rank, one per line, the
//! ranks in order), so that the tables live in the binary's read-only
//! pages, shared and paged in as used, instead of in hash maps built on the
//! heap at start-up.
//!
//! The file written, little-endian `u32`s then bytes:
//! `count`, `slots_len`, `ends[count + 1]` (token `i`'s bytes are
//! `blob[ends[i]..ends[i + 1]]`), `slots[slots_len]` (an open-addressing
//! table of `rank + 1` by FNV-1a hash of the bytes, linear probing, 0 for
//! empty), then `blob`.

#![allow(
    clippy::expect_used,
    reason = "a build step: a vocabulary that does not parse must stop the build"
)]

use std::path::PathBuf;

use base64::Engine as _;

const VOCABULARY: &str = "assets/o200k_base.tiktoken";

/// The functions a serving process runs, hottest first
/// (`scripts/link-order` writes it; see docs/performance.md).
const LINK_ORDER: &str = "assets/link-order.txt";

/// FNV-1a, 64 bits: the same function `src/budget/o200k.rs` looks up with.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn main() {
    println!("cargo::rerun-if-changed={VOCABULARY}");
    println!("cargo::rerun-if-changed=build.rs");
    order_functions();
    let text = std::fs::read_to_string(VOCABULARY).expect("read the o200k vocabulary");
    let mut blob = Vec::new();
    let mut ends = vec![0u32];
    for (line_number, line) in text.lines().enumerate() {
        let (token, rank) = line.split_once(' ').expect("`token rank` on every line");
        let rank: usize = rank.parse().expect("a rank");
        assert_eq!(rank, line_number, "ranks are in order, one per line");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(token)
            .expect("base64");
        blob.extend_from_slice(&bytes);
        ends.push(u32::try_from(blob.len()).expect("a blob under 4 GiB"));
    }
    let count = ends.len() - 1;
    // At most 40% full: short probes.
    let slots_len = (count * 5 / 2).next_power_of_two();
    let mut slots = vec![0u32; slots_len];
    for rank in 0..count {
        let bytes = &blob[ends[rank] as usize..ends[rank + 1] as usize];
        let mut slot = fnv1a(bytes) as usize & (slots_len - 1);
        while slots[slot] != 0 {
            slot = (slot + 1) & (slots_len - 1);
        }
        slots[slot] = u32::try_from(rank + 1).expect("ranks fit in u32");
    }
    let mut out = Vec::with_capacity(8 + 4 * (ends.len() + slots.len()) + blob.len());
    for n in [count, slots_len] {
        out.extend_from_slice(&u32::try_from(n).expect("fits").to_le_bytes());
    }
    for n in ends.iter().chain(&slots) {
        out.extend_from_slice(&n.to_le_bytes());
    }
    out.extend_from_slice(&blob);
    let path = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("o200k.bin");
    std::fs::write(path, out).expect("write the o200k tables");
}

/// In a release build for x86-64 Linux, where rustc links with its own lld
/// (the default since Rust 1.90), asks the linker to place the functions a
/// serving process runs next to each other, at the start of `.text`.
///
/// Why: the kernel maps a binary's code in 64 KiB blocks around each page
/// first run ("fault-around"), so the few hundred functions start-up and a
/// request run, scattered over 20 MB of code, made about 10 MB of it
/// resident. Together they are under 3 MB.
///
/// A symbol the file names that the binary no longer has is skipped, so an
/// out-of-date file costs memory, never a build. `IRIS_LINK_ORDER=off`
/// links without it, and so does a linker of one's own (configured, or
/// chosen by flags).
fn order_functions() {
    println!("cargo::rerun-if-changed={LINK_ORDER}");
    for var in ["IRIS_LINK_ORDER", "RUSTC_LINKER"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let env = |name: &str| std::env::var(name).unwrap_or_default();
    // Cargo sets `RUSTC_LINKER` when a linker is configured (in a config
    // file or the environment); flags may choose one too. Another linker
    // may not know lld's option: leave the layout alone then.
    let flags = env("CARGO_ENCODED_RUSTFLAGS");
    let own_linker =
        env("RUSTC_LINKER").is_empty() && !flags.contains("linker") && !flags.contains("fuse-ld");
    if env("PROFILE") != "release"
        || env("TARGET") != "x86_64-unknown-linux-gnu"
        || env("IRIS_LINK_ORDER") == "off"
        || !own_linker
    {
        return;
    }
    let path = PathBuf::from(env("CARGO_MANIFEST_DIR")).join(LINK_ORDER);
    if path.exists() {
        println!(
            "cargo::rustc-link-arg=-Wl,--symbol-ordering-file={}",
            path.display()
        );
        println!("cargo::rustc-link-arg=-Wl,--no-warn-symbol-ordering");
    }
}
