//! A text line's timestamp, as tracing-subscriber's `SystemTime` writes it
//! (`2026-12-06T05:29:26.892517Z`), with the date and time of day made once
//! a second per thread rather than for every line.

use std::cell::RefCell;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;

pub struct LineTime;

thread_local! {
    /// The second last written on this thread, and its text up to the
    /// fraction.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

impl FormatTime for LineTime {
    fn format_time(&self, writer: &mut Writer<'_>) -> fmt::Result {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        SECOND.with_borrow_mut(|(second, text)| {
            if *second != now.as_secs() {
                *second = now.as_secs();
                *text = second_text(now.as_secs());
            }
            writer.write_str(text)?;
            write!(writer, ".{:06}Z", now.subsec_micros())
        })
    }
}

/// `secs` after the Unix epoch, in UTC, to the second and without a zone:
/// `2026-12-06T05:29:26`.
fn second_text(secs: u64) -> String {
    let whole = i64::try_from(secs)
        .ok()
        .and_then(|secs| jiff::Timestamp::from_second(secs).ok())
        .unwrap_or(jiff::Timestamp::MAX)
        .to_string();
    whole.trim_end_matches('Z').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_are_written_as_the_default_timer_writes_them() {
        for (secs, text) in [
            (0, "1970-01-01T00:00:00"),
            (951_782_400, "2000-02-29T00:00:00"),
            (1_796_535_766, "2026-12-06T05:42:46"),
        ] {
            assert_eq!(second_text(secs), text);
        }
        // The same line as the default timer's, but for the fraction (and
        // the second, should it turn between the two).
        let format = |timer: &dyn FormatTime| {
            let mut line = String::new();
            timer.format_time(&mut Writer::new(&mut line)).unwrap();
            line
        };
        let ours = format(&LineTime);
        let default = format(&tracing_subscriber::fmt::time::SystemTime);
        assert_eq!(ours.len(), default.len(), "{ours} {default}");
        assert_eq!(ours[..16], default[..16], "{ours} {default}");
        assert!(ours.ends_with('Z') && ours.as_bytes()[19] == b'.', "{ours}");
    }
}
