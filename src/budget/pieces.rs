//! o200k_base's pre-tokenizer, by hand: the text split into the pieces its
//! pattern finds, in one forward pass.
//!
//! tiktoken splits with a backtracking regex (the pattern needs a
//! look-ahead, `\s+(?!\S)`). Compiled, with its Unicode classes, forward
//! and reverse automata and caches, that regex took about 14 MB of every
//! process with a token limit, and its matching was most of a count's
//! time. The pattern is seven alternatives over a few character classes,
//! so it is written out here as what a backtracking match of it does at
//! each position (the first alternative that matches, each quantifier
//! greedy, giving back only what the rest needs). The classes come from
//! `regex-syntax`'s Unicode tables, the very ones the regex used, so the
//! pieces are the same (the tests compare them with the regex's, piece
//! for piece).
//!
//! The pattern, as tiktoken has it (`L` letters, `N` numbers, `M` marks):
//!
//! ```text
//! 1  [^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?
//! 2  [^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?
//! 3  \p{N}{1,3}
//! 4   ?[^\s\p{L}\p{N}]+[\r\n/]*
//! 5  \s*[\r\n]+
//! 6  \s+(?!\S)
//! 7  \s+
//! ```

use std::sync::OnceLock;

/// What the pattern tells characters apart by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `Lu` and `Lt`: only in the "upper" class.
    Upper,
    /// `Ll`: only in the "lower" class.
    Lower,
    /// Marks (`M`): in both classes, and not letters.
    Mark,
    /// `Lm` and `Lo`: letters in both classes.
    CaselessLetter,
    Number,
    /// `\s`: Unicode's `White_Space`.
    Space,
    Other,
}

impl Kind {
    /// `[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]`
    fn upper(self) -> bool {
        matches!(self, Self::Upper | Self::Mark | Self::CaselessLetter)
    }

    /// `[\p{Ll}\p{Lm}\p{Lo}\p{M}]`
    fn lower(self) -> bool {
        matches!(self, Self::Lower | Self::Mark | Self::CaselessLetter)
    }

    fn letter(self) -> bool {
        matches!(self, Self::Upper | Self::Lower | Self::CaselessLetter)
    }

    /// `[^\s\p{L}\p{N}]`: marks and everything else.
    fn symbol(self) -> bool {
        matches!(self, Self::Mark | Self::Other)
    }
}

/// The classes as sorted, disjoint ranges (everything outside them is
/// [`Kind::Other`]), and ASCII's kinds by byte.
struct Classes {
    ranges: Vec<(u32, u32, Kind)>,
    ascii: [Kind; 128],
}

fn classes() -> Option<&'static Classes> {
    static CLASSES: OnceLock<Option<Classes>> = OnceLock::new();
    CLASSES
        .get_or_init(|| {
            let classes = Classes::new();
            if classes.is_none() {
                tracing::error!("the o200k pre-tokenizer's Unicode classes are unavailable");
            }
            classes
        })
        .as_ref()
}

impl Classes {
    fn new() -> Option<Self> {
        let mut ranges = Vec::new();
        for (class, kind) in [
            (r"[\p{Lu}\p{Lt}]", Kind::Upper),
            (r"\p{Ll}", Kind::Lower),
            (r"[\p{Lm}\p{Lo}]", Kind::CaselessLetter),
            (r"\p{M}", Kind::Mark),
            (r"\p{N}", Kind::Number),
            (r"\s", Kind::Space),
        ] {
            let hir = regex_syntax::parse(class).ok()?;
            let regex_syntax::hir::HirKind::Class(regex_syntax::hir::Class::Unicode(set)) =
                hir.kind()
            else {
                return None;
            };
            ranges.extend(
                set.ranges()
                    .iter()
                    .map(|r| (u32::from(r.start()), u32::from(r.end()), kind)),
            );
        }
        ranges.sort_unstable_by_key(|&(start, _, _)| start);
        // Unicode's categories and White_Space do not overlap.
        if ranges.windows(2).any(|w| w[0].1 >= w[1].0) {
            return None;
        }
        let mut ascii = [Kind::Other; 128];
        for (byte, kind) in (0u32..).zip(ascii.iter_mut()) {
            *kind = Self::search(&ranges, byte);
        }
        Some(Self { ranges, ascii })
    }

    fn search(ranges: &[(u32, u32, Kind)], c: u32) -> Kind {
        match ranges.binary_search_by(|&(start, end, _)| {
            if end < c {
                std::cmp::Ordering::Less
            } else if start > c {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        }) {
            Ok(i) => ranges[i].2,
            Err(_) => Kind::Other,
        }
    }

    fn kind(&self, c: char) -> Kind {
        match self.ascii.get(c as usize) {
            Some(&kind) => kind,
            None => Self::search(&self.ranges, u32::from(c)),
        }
    }
}

/// The pieces of `text`, in order; `None` when the classes are unusable.
pub fn pieces(text: &str) -> Option<Pieces<'_>> {
    Some(Pieces {
        text,
        at: 0,
        classes: classes()?,
    })
}

pub struct Pieces<'a> {
    text: &'a str,
    at: usize,
    classes: &'static Classes,
}

impl<'a> Iterator for Pieces<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let start = self.at;
        let end = Scan {
            text: self.text,
            classes: self.classes,
        }
        .piece(start)?;
        self.at = end;
        Some(&self.text[start..end])
    }
}

/// The text and its classes, to read characters by byte offset.
#[derive(Clone, Copy)]
struct Scan<'a> {
    text: &'a str,
    classes: &'static Classes,
}

impl Scan<'_> {
    /// The character at byte `at`, its kind, and the offset after it.
    fn at(self, at: usize) -> Option<(char, Kind, usize)> {
        let c = self.text.get(at..)?.chars().next()?;
        Some((c, self.classes.kind(c), at + c.len_utf8()))
    }

    /// The end of a run of characters `keep` accepts, from `at`.
    fn run(self, mut at: usize, keep: impl Fn(char, Kind) -> bool) -> usize {
        while let Some((c, kind, next)) = self.at(at) {
            if !keep(c, kind) {
                break;
            }
            at = next;
        }
        at
    }

    /// The end of the piece that starts at `at` (none at the text's end).
    /// Every character starts a piece of some alternative, so the pieces
    /// cover the text.
    fn piece(self, at: usize) -> Option<usize> {
        let (c, kind, after) = self.at(at)?;
        // `[^\r\n\p{L}\p{N}]?`: tried taken, then not (a mark is both a
        // prefix and a letter-class character).
        let prefix = c != '\r' && c != '\n' && !kind.letter() && kind != Kind::Number;
        let starts: &[usize] = if prefix { &[after, at] } else { &[at] };
        let found = starts
            .iter()
            .find_map(|&from| self.lower_word(from))
            .or_else(|| starts.iter().find_map(|&from| self.upper_word(from)))
            .or_else(|| self.numbers(at))
            .or_else(|| self.symbols(at))
            .or_else(|| self.spaces(at));
        // Not reachable (each character starts some alternative, and none
        // matches nothing); a character alone keeps the count going if it
        // were.
        Some(found.filter(|&end| end > at).unwrap_or(after))
    }

    /// 1: `U* W+ C?` from `at`, `U*` giving back until a `W` follows.
    fn lower_word(self, at: usize) -> Option<usize> {
        // The upper run, and the end of its last character that is also
        // lower (where `W+` can start once `U*` gives back to it).
        let mut end = at;
        let mut last_lower = None;
        while let Some((_, kind, next)) = self.at(end) {
            if !kind.upper() {
                break;
            }
            if kind.lower() {
                last_lower = Some(next);
            }
            end = next;
        }
        let word_end = match self.at(end) {
            // After the whole run, `W+` takes every lower character.
            Some((_, kind, _)) if kind.lower() => self.run(end, |_, kind| kind.lower()),
            // Else the run gives back to its last lower character, which
            // `W+` takes alone (only upper-only ones follow it).
            _ => last_lower?,
        };
        Some(self.contraction(word_end))
    }

    /// 2: `U+ W* C?` from `at`.
    fn upper_word(self, at: usize) -> Option<usize> {
        let end = self.run(at, |_, kind| kind.upper());
        if end == at {
            return None;
        }
        let end = self.run(end, |_, kind| kind.lower());
        Some(self.contraction(end))
    }

    /// `(?i:'s|'t|'re|'ve|'m|'ll|'d)?` at `at`: where it ends.
    fn contraction(self, at: usize) -> usize {
        let rest = &self.text[at..];
        let Some(rest) = rest.strip_prefix('\'') else {
            return at;
        };
        let mut chars = rest.chars().map(fold);
        let taken = match (chars.next(), chars.next()) {
            (Some('s' | 't' | 'm' | 'd'), _) => 1,
            (Some('r'), Some('e')) | (Some('v'), Some('e')) | (Some('l'), Some('l')) => 2,
            _ => return at,
        };
        let suffix: usize = rest.chars().take(taken).map(char::len_utf8).sum();
        at + 1 + suffix
    }

    /// 3: `\p{N}{1,3}`.
    fn numbers(self, at: usize) -> Option<usize> {
        let mut end = at;
        for _ in 0..3 {
            match self.at(end) {
                Some((_, Kind::Number, next)) => end = next,
                _ => break,
            }
        }
        (end > at).then_some(end)
    }

    /// 4: ` ?[^\s\p{L}\p{N}]+[\r\n/]*`.
    fn symbols(self, at: usize) -> Option<usize> {
        let from = match self.at(at)? {
            (' ', _, next) if self.at(next).is_some_and(|(_, kind, _)| kind.symbol()) => next,
            (_, kind, _) if kind.symbol() => at,
            _ => return None,
        };
        let end = self.run(from, |_, kind| kind.symbol());
        Some(self.run(end, |c, _| matches!(c, '\r' | '\n' | '/')))
    }

    /// 5, 6 and 7, over the whitespace run at `at`.
    fn spaces(self, at: usize) -> Option<usize> {
        let mut end = at;
        let mut last_newline_end = None;
        let mut last_start = at;
        while let Some((c, Kind::Space, next)) = self.at(end) {
            if matches!(c, '\r' | '\n') {
                last_newline_end = Some(next);
            }
            last_start = end;
            end = next;
        }
        if end == at {
            return None;
        }
        // 5: `\s*` gives back to the run's last newline, which `[\r\n]+`
        // takes (no newline follows it in the run).
        if let Some(newline_end) = last_newline_end {
            return Some(newline_end);
        }
        // 6: the whole run before the text's end; else all but its last
        // character, which the next piece starts with (if the run has more
        // than one). 7: a single space before a non-space.
        if end == self.text.len() || last_start == at {
            Some(end)
        } else {
            Some(last_start)
        }
    }
}

/// The simple case folding `(?i)` applies to the contractions' letters
/// (`ſ`, the long s, folds to `s`).
fn fold(c: char) -> char {
    match c {
        'ſ' => 's',
        c => c.to_ascii_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pieces as tiktoken's regex finds them.
    fn by_regex(text: &str) -> Vec<&str> {
        static PATTERN: OnceLock<fancy_regex::Regex> = OnceLock::new();
        PATTERN
            .get_or_init(|| {
                fancy_regex::Regex::new(concat!(
                    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
                    "|",
                    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
                    "|",
                    r"\p{N}{1,3}",
                    "|",
                    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
                    "|",
                    r"\s*[\r\n]+",
                    "|",
                    r"\s+(?!\S)",
                    "|",
                    r"\s+",
                ))
                .expect("pattern")
            })
            .find_iter(text)
            .map(|m| m.expect("match").as_str())
            .collect()
    }

    fn by_hand(text: &str) -> Vec<&str> {
        pieces(text).expect("classes").collect()
    }

    #[test]
    fn pieces_are_the_regexs_on_texts_of_every_shape() {
        for text in [
            "",
            "Hello, world! It's 2026-12-05; the price is $1,234.56 (approx.)",
            "I'M SHOUTING, YOU'RE NOT, WE'LL SEE, THEY'D KNOW; we'Ve we'lL 'S",
            "Les élèves n'ont pas vu l'éclipse",
            "東京は日本の首都です。人口は約1400万人です。",
            "   leading spaces\n\n\ttabs\r\n\r\nand CRLF   \n",
            "a  b   c    \u{a0}\u{3000}x\u{2028}\u{85}y  ",
            "path/to/file.rs\n// comment\r\n/* x */",
            "e\u{301}te\u{301} \u{301}\u{301}a \u{301}B\u{301}",
            "ǅemal ʰaʰ ʰ ABCʰ ABʰC aBʰ",
            "Ⅻ½٣12345 1a2b",
            "it'ſ it\u{17f}s don't 'tis",
        ] {
            assert_eq!(by_hand(text), by_regex(text), "{text:?}");
        }
    }

    /// Random texts over an alphabet of one or two characters of every
    /// kind the pattern tells apart, compared piece for piece.
    #[test]
    fn pieces_are_the_regexs_on_random_texts() {
        const ALPHABET: &[char] = &[
            'a', 'z', 's', 't', 'r', 'e', 'v', 'm', 'l', 'd', 'A', 'S', 'L', 'D', 'é', 'É', 'ǅ',
            'ʰ', 'あ', 'ا', '\u{301}', '\u{903}', '\u{20dd}', '0', '9', '٣', 'Ⅻ', '½', ' ', ' ',
            '\t', '\n', '\r', '\u{a0}', '\u{3000}', '\u{2028}', '\u{85}', '\'', '/', '.', ',', '!',
            '$', '-', '🙂', '\u{17f}', '\u{0}', '\u{7f}',
        ];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let length = (next() % 24) as usize;
            let text: String = (0..length)
                .map(|_| ALPHABET[(next() % ALPHABET.len() as u64) as usize])
                .collect();
            assert_eq!(by_hand(&text), by_regex(&text), "{text:?}");
        }
    }
}
