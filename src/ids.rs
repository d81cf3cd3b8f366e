//! Ids unique within the process, and across processes by a random prefix
//! chosen when the first is made: a request's id and its spend record's.
//! One of each is made for every request, so they are written by hand, not
//! by `format!`.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Makes ids: a fixed start, random hex, then a counter in hex.
pub struct Ids {
    start: &'static str,
    random_bytes: usize,
    /// The counter is padded with zeros to at least this many digits.
    counter_digits: usize,
    prefix: OnceLock<String>,
    counter: AtomicU64,
}

impl Ids {
    /// `random_bytes` is at most 8.
    pub const fn new(start: &'static str, random_bytes: usize, counter_digits: usize) -> Self {
        Self {
            start,
            random_bytes,
            counter_digits,
            prefix: OnceLock::new(),
            counter: AtomicU64::new(0),
        }
    }

    pub fn next(&self) -> String {
        let prefix = self.prefix.get_or_init(|| {
            let mut bytes = [0u8; 8];
            if getrandom::fill(&mut bytes).is_err() {
                // No randomness: the time is the next best thing to tell
                // processes apart.
                #[expect(
                    clippy::cast_possible_truncation,
                    reason = "the clock's low 64 bits are the ones that differ"
                )]
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                bytes = now.to_le_bytes();
            }
            let random = &bytes[..self.random_bytes.min(bytes.len())];
            let mut prefix = String::with_capacity(self.start.len() + 2 * random.len());
            prefix.push_str(self.start);
            prefix.push_str(&hex::encode(random));
            prefix
        });
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut id = String::with_capacity(prefix.len() + 16);
        id.push_str(prefix);
        push_hex(&mut id, n, self.counter_digits);
        id
    }
}

/// Appends `n` in lowercase hex, padded with zeros to `digits`.
fn push_hex(out: &mut String, n: u64, digits: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let needed = (16 - n.leading_zeros() as usize / 4).max(digits).min(16);
    for place in (0..needed).rev() {
        out.push(char::from(HEX[(n >> (4 * place)) as usize & 0xf]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_hex_padded_to_their_digits() {
        for (n, digits, hex) in [
            (0, 1, "0"),
            (0, 10, "0000000000"),
            (0xab, 1, "ab"),
            (0xab, 4, "00ab"),
            (u64::MAX, 10, "ffffffffffffffff"),
            (1 << 60, 1, "1000000000000000"),
        ] {
            let mut out = String::new();
            push_hex(&mut out, n, digits);
            assert_eq!(out, hex, "{n:x} to {digits}");
            assert_eq!(out, format!("{n:0digits$x}"));
        }
    }

    #[test]
    fn ids_share_a_random_prefix_and_count() {
        let ids = Ids::new("req_", 6, 10);
        let (first, second) = (ids.next(), ids.next());
        assert_eq!(first.len(), 4 + 12 + 10, "{first}");
        assert_eq!(first[..16], second[..16]);
        assert!(first.starts_with("req_") && first.ends_with("0000000000"));
        assert!(second.ends_with("0000000001"), "{second}");
        assert!(first.bytes().all(|b| b.is_ascii_graphic()));
        let other = Ids::new("", 8, 1);
        assert_eq!(other.next().len(), 16 + 1);
    }
}
