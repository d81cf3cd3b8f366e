//! Token counts under o200k_base (GPT-4o's tokenizer), from compact tables
//! in the binary's read-only pages.
//!
//! The algorithm is tiktoken's: the text is split into pieces by o200k's
//! pattern (written out by hand in [`super::pieces`]); a piece that is a
//! token counts 1; any other is byte-pair merged,
//! lowest rank first, and counts the tokens it merges into. Only counts are
//! needed, never token ids, and the vocabulary is only looked up: so
//! instead of tiktoken's hash maps (the encoder, the decoder and a sorted
//! copy, 200,000 heap allocations each, about 46 MB resident), the
//! vocabulary is one table built at compile time (`build.rs`): every
//! token's bytes end to end, where each ends, and an open-addressing index
//! by hash, about 4 MiB in all, paged in from the binary as lookups touch
//! it. The counts are tiktoken's, token for token (see the tests).

use std::collections::BinaryHeap;
use std::sync::OnceLock;

/// `build.rs`'s tables: `count`, `slots_len`, `ends`, `slots`, `blob`.
static TABLES: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/o200k.bin"));

/// Pieces shorter than this merge by rescanning a small vector (tiktoken's
/// choice: faster for the short pieces nearly every text is made of);
/// longer ones through a heap.
const SHORT_PIECE: usize = 100;

type Rank = u32;

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    bytes
        .get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

/// FNV-1a, 64 bits: the hash `build.rs` placed the tokens with.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The vocabulary, as views into [`TABLES`].
struct Vocabulary {
    count: usize,
    slots_mask: usize,
    ends: &'static [u8],
    slots: &'static [u8],
    blob: &'static [u8],
}

impl Vocabulary {
    fn new() -> Option<Self> {
        let count = u32_at(TABLES, 0) as usize;
        let slots_len = u32_at(TABLES, 4) as usize;
        let ends_at = 8;
        let slots_at = ends_at + 4 * (count + 1);
        let blob_at = slots_at + 4 * slots_len;
        if count == 0 || !slots_len.is_power_of_two() || TABLES.len() < blob_at {
            return None;
        }
        Some(Self {
            count,
            slots_mask: slots_len - 1,
            ends: &TABLES[ends_at..slots_at],
            slots: &TABLES[slots_at..blob_at],
            blob: &TABLES[blob_at..],
        })
    }

    fn token(&self, rank: usize) -> &'static [u8] {
        let start = u32_at(self.ends, 4 * rank) as usize;
        let end = u32_at(self.ends, 4 * (rank + 1)) as usize;
        self.blob.get(start..end).unwrap_or_default()
    }

    /// The rank of the token whose bytes are `bytes`, if there is one.
    fn rank(&self, bytes: &[u8]) -> Option<Rank> {
        let mut slot = fnv1a(bytes) as usize & self.slots_mask;
        loop {
            let entry = u32_at(self.slots, 4 * slot);
            if entry == 0 {
                return None;
            }
            let rank = entry - 1;
            if (rank as usize) < self.count && self.token(rank as usize) == bytes {
                return Some(rank);
            }
            slot = (slot + 1) & self.slots_mask;
        }
    }
}

fn vocabulary() -> Option<&'static Vocabulary> {
    static VOCABULARY: OnceLock<Option<Vocabulary>> = OnceLock::new();
    VOCABULARY.get_or_init(Vocabulary::new).as_ref()
}

/// Tokens in `text` under o200k_base, as tiktoken's `encode_ordinary`
/// counts them; `None` when the tables are unusable.
pub fn count(text: &str) -> Option<u64> {
    let vocabulary = vocabulary()?;
    let mut total = 0u64;
    for piece in super::pieces::pieces(text)? {
        let piece = piece.as_bytes();
        total += match vocabulary.rank(piece) {
            Some(_) => 1,
            None => merged_count(vocabulary, piece) as u64,
        };
    }
    Some(total)
}

/// How many tokens byte-pair merging makes of `piece` (not a token
/// itself), merging the pair of lowest rank first.
fn merged_count(vocabulary: &Vocabulary, piece: &[u8]) -> usize {
    match piece.len() {
        0 => 0,
        1 => 1,
        n if n < SHORT_PIECE => merged_count_short(vocabulary, piece),
        _ => merged_count_long(vocabulary, piece),
    }
}

/// tiktoken's `_byte_pair_merge`: the parts' starts with the rank of the
/// pair each begins, rescanned for the lowest after each merge.
fn merged_count_short(vocabulary: &Vocabulary, piece: &[u8]) -> usize {
    let rank_of = |parts: &[(usize, Rank)], i: usize| -> Rank {
        if i + 3 < parts.len() {
            vocabulary
                .rank(&piece[parts[i].0..parts[i + 3].0])
                .unwrap_or(Rank::MAX)
        } else {
            Rank::MAX
        }
    };
    let mut parts: Vec<(usize, Rank)> = Vec::with_capacity(piece.len() + 1);
    for i in 0..piece.len() - 1 {
        parts.push((i, vocabulary.rank(&piece[i..i + 2]).unwrap_or(Rank::MAX)));
    }
    parts.push((piece.len() - 1, Rank::MAX));
    parts.push((piece.len(), Rank::MAX));
    while let Some((i, _)) = parts[..parts.len() - 1]
        .iter()
        .enumerate()
        .filter(|(_, (_, rank))| *rank != Rank::MAX)
        .min_by_key(|(i, (_, rank))| (*rank, *i))
    {
        if i > 0 {
            parts[i - 1].1 = rank_of(&parts, i - 1);
        }
        parts[i].1 = rank_of(&parts, i);
        parts.remove(i + 1);
    }
    parts.len() - 1
}

/// A pair that may merge: the left part's start and the merged rank.
#[derive(PartialEq, Eq)]
struct Merge {
    start: usize,
    rank: Rank,
}

impl Ord for Merge {
    /// The lowest rank first, then the leftmost (a max-heap pops the
    /// greatest: reversed).
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other
            .rank
            .cmp(&self.rank)
            .then_with(|| other.start.cmp(&self.start))
    }
}

impl PartialOrd for Merge {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// One part of a piece being merged, at its start position.
#[derive(Clone, Copy)]
struct Part {
    prev: usize,
    end: usize,
    next_end: usize,
    /// The rank of merging with the next part (`Rank::MAX`: none).
    next_rank: Rank,
}

/// tiktoken's `_byte_pair_merge_large`: the same merges in O(n log n),
/// through a heap of candidate merges, stale ones skipped.
fn merged_count_long(vocabulary: &Vocabulary, piece: &[u8]) -> usize {
    let n = piece.len();
    let mut parts: Vec<Part> = (0..n)
        .map(|i| Part {
            prev: i.wrapping_sub(1),
            end: i + 1,
            next_end: i + 2,
            next_rank: Rank::MAX,
        })
        .collect();
    let mut heap = BinaryHeap::with_capacity(n);
    for i in 0..n - 1 {
        if let Some(rank) = vocabulary.rank(&piece[i..i + 2]) {
            heap.push(Merge { start: i, rank });
            parts[i].next_rank = rank;
        }
    }
    let candidate =
        |parts: &mut Vec<Part>, heap: &mut BinaryHeap<Merge>, start: usize, next_end: usize| {
            parts[start].next_end = next_end;
            parts[start].next_rank = Rank::MAX;
            if next_end <= n
                && let Some(rank) = vocabulary.rank(&piece[start..next_end])
            {
                heap.push(Merge { start, rank });
                parts[start].next_rank = rank;
            }
        };
    while let Some(left) = heap.pop() {
        if left.rank != parts[left.start].next_rank {
            continue; // invalidated since it was pushed
        }
        let left_start = left.start;
        let right_start = parts[left_start].end;
        let right_end = parts[left_start].next_end;
        let right_next_end = parts[right_start].next_end;
        parts[left_start].end = right_end;
        candidate(&mut parts, &mut heap, left_start, right_next_end);
        if right_end < n {
            parts[right_end].prev = left_start;
        }
        if left_start > 0 {
            let prev_start = parts[left_start].prev;
            candidate(&mut parts, &mut heap, prev_start, right_end);
        }
        parts[right_start].next_rank = Rank::MAX;
    }
    let mut tokens = 0;
    let mut i = 0;
    while i < n {
        tokens += 1;
        i = parts[i].end;
    }
    tokens
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(text: &str) -> u64 {
        static BPE: OnceLock<tiktoken_rs::CoreBPE> = OnceLock::new();
        BPE.get_or_init(|| tiktoken_rs::o200k_base().expect("tiktoken's o200k"))
            .encode_ordinary(text)
            .len() as u64
    }

    /// Texts of the shapes prompts come in: prose in several scripts,
    /// code, JSON, numbers, whitespace runs, emoji, and long pieces that
    /// take the heap path.
    fn corpus() -> Vec<String> {
        let mut texts: Vec<String> = [
            "Say hello",
            "Tell me, in as many words as you like, about tokenizers.",
            "Hello, world! It's 2026-12-05; the price is $1,234.56 (approx.)",
            "Les élèves n'ont pas vu l'éclipse, mais ils l'ont entendue.",
            "Съешь же ещё этих мягких французских булок, да выпей чаю.",
            "東京は日本の首都です。人口は約1400万人です。",
            "مرحبا بالعالم، كيف حالك اليوم؟",
            "🙂🙃 emoji 👩‍👩‍👧‍👦 family, flags 🇫🇷🇩🇪",
            "fn main() {\n    let x = vec![1, 2, 3];\n    println!(\"{x:?}\");\n}\n",
            "{\"model\": \"gpt-4o\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}",
            "   leading spaces\n\n\ttabs\r\n\r\nand CRLF   \n",
            "I'M SHOUTING, YOU'RE NOT, WE'LL SEE, THEY'D KNOW",
            "1234567890 3.14159 0xDEADBEEF 1e-9 -42",
            "",
            " ",
            "\n",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        texts.push("a".repeat(5000));
        texts.push("ab".repeat(700));
        texts.push("supercalifragilisticexpialidocious".repeat(20));
        texts.push("x".repeat(99) + " " + &"y".repeat(100));
        texts.push("🙂".repeat(300));
        // Every byte-level oddity a piece can hold.
        texts.push((0u8..128).map(char::from).collect());
        texts.push(include_str!("estimate.rs").to_owned());
        texts
    }

    #[test]
    fn counts_are_tiktokens_on_every_text_of_the_corpus() {
        for text in corpus() {
            assert_eq!(
                count(&text),
                Some(reference(&text)),
                "{:?}",
                &text[..text.len().min(80)]
            );
        }
    }

    #[test]
    fn the_vocabulary_is_whole_and_every_token_finds_its_rank() {
        let vocabulary = Vocabulary::new().expect("tables");
        // 199,998 ranks in o200k_base's file (two more are special tokens).
        assert_eq!(vocabulary.count, 199_998);
        for rank in (0..vocabulary.count).step_by(7) {
            assert_eq!(
                vocabulary.rank(vocabulary.token(rank)),
                Some(rank as Rank),
                "{rank}"
            );
        }
        assert_eq!(vocabulary.rank(b"\xff\xfe\xfd not a token"), None);
    }

    #[test]
    fn the_vocabulary_is_openais() {
        use sha2::Digest as _;
        // tiktoken's pin for o200k_base.tiktoken.
        let digest = sha2::Sha256::digest(include_bytes!("../../assets/o200k_base.tiktoken"));
        assert_eq!(
            hex::encode(digest),
            "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
        );
    }
}
