//! Token counts of prompt texts already counted. A client sends the same
//! system prompt with every request, and in a conversation every earlier
//! message again with each turn; tokenizing costs about 0.13 ms per KiB,
//! looking a count up here two hashes of the text.
//!
//! A count is kept under a 128-bit hash of its text, keyed with seeds
//! drawn at random when the process starts: nothing of a prompt is held,
//! and a client cannot make two texts share a count without knowing the
//! seeds (and would only have misestimated its own request, which
//! settlement corrects). At most [`MAX_KEPT`] counts, for the whole
//! process; when full, all are forgotten at once, and the texts still sent
//! are counted and kept again.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{LazyLock, Mutex, PoisonError};

/// Counts kept at most: about 240 KB.
const MAX_KEPT: usize = 8192;

/// The process's counts.
static COUNTED: LazyLock<Counted> = LazyLock::new(Counted::default);

/// `text`'s tokens: the count kept for it, else `count(text)`, then kept.
pub fn count_or(text: &str, count: impl FnOnce(&str) -> u64) -> u64 {
    COUNTED.count_or(text, count)
}

/// Whether a count of `text` is kept: it would be looked up, not counted.
pub fn is_kept(text: &str) -> bool {
    COUNTED.is_kept(text)
}

#[derive(Default)]
struct Counted {
    seeds: [foldhash::quality::RandomState; 2],
    counts: Mutex<HashMap<u128, u64, foldhash::fast::RandomState>>,
}

impl Counted {
    /// [`count_or`]; the lock is not held while counting.
    fn count_or(&self, text: &str, count: impl FnOnce(&str) -> u64) -> u64 {
        let key = self.key(text);
        let lock = || self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(&tokens) = lock().get(&key) {
            return tokens;
        }
        let tokens = count(text);
        let mut counts = lock();
        if counts.len() >= MAX_KEPT {
            counts.clear();
        }
        counts.insert(key, tokens);
        tokens
    }

    fn key(&self, text: &str) -> u128 {
        let [first, second] = &self.seeds;
        u128::from(first.hash_one(text)) << 64 | u128::from(second.hash_one(text))
    }

    fn is_kept(&self, text: &str) -> bool {
        let key = self.key(text);
        self.counts
            .lock()
            .is_ok_and(|counts| counts.contains_key(&key))
    }

    #[cfg(test)]
    fn kept(&self) -> usize {
        self.counts.lock().map_or(0, |counts| counts.len())
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    #[test]
    fn a_text_counted_again_is_looked_up_and_another_is_counted() {
        let calls = Cell::new(0);
        let count = |text: &str| {
            calls.set(calls.get() + 1);
            text.len() as u64
        };
        let counted = Counted::default();
        let text = "counted: the one text of this test";
        assert_eq!(counted.count_or(text, count), 34);
        assert_eq!(counted.count_or(text, |_| unreachable!("kept")), 34);
        assert_eq!(calls.get(), 1);
        assert_eq!(
            counted.count_or("counted: another text of this test", count),
            34
        );
        assert_eq!(calls.get(), 2, "a different text is counted");
        // The hash covers the whole text: one byte more is another text.
        assert_eq!(
            counted.count_or("counted: the one text of this test.", count),
            35
        );
        assert_eq!(calls.get(), 3);
    }

    #[test]
    fn the_counts_kept_are_bounded() {
        let counted = Counted::default();
        for i in 0..MAX_KEPT + 10 {
            counted.count_or(&format!("counted: bounded {i}"), |_| 1);
            assert!(counted.kept() <= MAX_KEPT);
        }
        assert_eq!(counted.kept(), 10, "forgotten when full, then kept again");
        let last = format!("counted: bounded {}", MAX_KEPT + 9);
        assert_eq!(counted.count_or(&last, |_| unreachable!("kept")), 1);
    }
}
