//! The response relay's tap: SSE events and whole bodies, cut into arbitrary
//! chunks, watched for `usage` and the generated text, with the usage-only
//! event removed when Iris asked for it on the client's behalf.
//!
//! The first two input bytes seed how the rest (the upstream's body) is cut
//! into chunks. Properties:
//! - nothing panics;
//! - without removal, the bytes out are the bytes in, for any chunking;
//! - what the tap reports (usage, generated text) does not depend on the
//!   chunking, nor on whether the usage event is removed;
//! - with removal, the bytes out do not depend on the chunking, are at most
//!   the bytes in, and are the bytes in when no event can mention `usage`.
#![no_main]

use bytes::Bytes;
use iris::openai::stream::{Outcome, UsageTap};
use libfuzzer_sys::fuzz_target;

/// Runs `body` through a tap in chunks cut by `seed` (0: one chunk).
fn run(
    body: &[u8],
    streaming: bool,
    drop_usage: bool,
    seed: u16,
    complete: bool,
) -> (Vec<u8>, Outcome) {
    let mut tap = UsageTap::new(streaming, drop_usage);
    let mut out = Vec::new();
    let mut state = u32::from(seed) | 1;
    let mut rest = body;
    while !rest.is_empty() {
        let len = if seed == 0 {
            rest.len()
        } else {
            // xorshift: chunks of 1 to 32 bytes, often cutting "\n\n" and "\r\n".
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state % 32 + 1) as usize
        };
        let (chunk, tail) = rest.split_at(len.min(rest.len()));
        rest = tail;
        out.extend_from_slice(&tap.on_chunk(Bytes::copy_from_slice(chunk)));
    }
    let (unsent, outcome) = tap.finish(complete);
    if let Some(unsent) = unsent {
        out.extend_from_slice(&unsent);
    }
    assert_eq!(outcome.complete, complete);
    (out, outcome)
}

fn same_report(a: &Outcome, b: &Outcome, what: &str) {
    assert_eq!(a.usage, b.usage, "usage differs: {what}");
    assert_eq!(a.generated, b.generated, "generated text differs: {what}");
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let seed = u16::from_le_bytes([data[0], data[1]]);
    let body = &data[2..];
    let complete = seed % 3 != 0;

    for streaming in [true, false] {
        let (whole, reference) = run(body, streaming, false, 0, complete);
        assert_eq!(
            whole, body,
            "bytes out are bytes in (streaming: {streaming})"
        );
        let (out, outcome) = run(body, streaming, false, seed, complete);
        assert_eq!(
            out, body,
            "bytes out are bytes in, chunked (streaming: {streaming})"
        );
        same_report(&outcome, &reference, "chunked");

        let (removed_whole, removed_report) = run(body, streaming, true, 0, complete);
        same_report(&removed_report, &reference, "usage event removed");
        let (removed, chunked_report) = run(body, streaming, true, seed, complete);
        same_report(&chunked_report, &reference, "usage event removed, chunked");
        assert_eq!(
            removed, removed_whole,
            "removal does not depend on the chunking"
        );
        assert!(removed.len() <= body.len());
        // (`usage` may be spelled with escapes: `\u0075sage`.)
        let may_mention_usage =
            body.windows(5).any(|w| w == b"usage") || body.windows(2).any(|w| w == b"\\u");
        if !streaming || !may_mention_usage {
            assert_eq!(removed, body, "nothing to remove");
        }
    }
});
