//! How a text log line writes its fields: as tracing-subscriber's default
//! formatter does (`name=value`, values as `Debug` writes them, the message
//! bare, ANSI and C1 control characters in it escaped), without its styling
//! wrappers and character-by-character escaping in the common case. At the
//! default level every request writes two lines of about a dozen fields
//! each; the default formatter spent some 20,000 instructions on each.
//! Strings that need no escape and integers are written directly.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};

/// The fields of a text line, for `fmt().fmt_fields(..)`.
pub struct LineFields;

impl<'a> MakeVisitor<Writer<'a>> for LineFields {
    type Visitor = LineVisitor<'a>;

    fn make_visitor(&self, writer: Writer<'a>) -> LineVisitor<'a> {
        LineVisitor {
            sanitize: writer.sanitizes_ansi_escapes(),
            writer,
            first: true,
            result: Ok(()),
        }
    }
}

pub struct LineVisitor<'a> {
    writer: Writer<'a>,
    sanitize: bool,
    first: bool,
    result: fmt::Result,
}

impl LineVisitor<'_> {
    /// The space before every field but the first, then the field's
    /// `name=` (none for the message).
    fn start(&mut self, field: &Field) -> fmt::Result {
        if self.first {
            self.first = false;
        } else {
            self.writer.write_char(' ')?;
        }
        match field.name() {
            "message" => Ok(()),
            name => {
                self.writer
                    .write_str(name.strip_prefix("r#").unwrap_or(name))?;
                self.writer.write_char('=')
            }
        }
    }

    fn message(&mut self, value: &dyn fmt::Debug) -> fmt::Result {
        if self.sanitize {
            write!(Escaping(&mut self.writer), "{value:?}")
        } else {
            write!(self.writer, "{value:?}")
        }
    }
}

impl Visit for LineVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        self.result = self.start(field).and_then(|()| {
            if field.name() == "message" {
                self.message(&format_args!("{value}"))
            } else if value
                .bytes()
                .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
            {
                // What `Debug` writes for a string that needs no escape.
                self.writer.write_char('"')?;
                self.writer.write_str(value)?;
                self.writer.write_char('"')
            } else {
                write!(self.writer, "{value:?}")
            }
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.record_integer(field, false, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.record_integer(field, value < 0, value.unsigned_abs());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.result.is_err() {
            return;
        }
        self.result = self.start(field).and_then(|()| {
            if field.name() == "message" {
                self.message(&value)
            } else {
                self.writer.write_str(if value { "true" } else { "false" })
            }
        });
    }

    /// As the default formatter writes an error (its sources listed), by
    /// the default formatter: errors are rare, and not worth a copy.
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if self.result.is_err() {
            return;
        }
        let mut default = DefaultVisitor::new(self.writer.by_ref(), self.first);
        default.record_error(field, value);
        self.first = false;
        self.result = default.finish();
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        self.result = self.start(field).and_then(|()| {
            if field.name() == "message" {
                self.message(value)
            } else {
                write!(self.writer, "{value:?}")
            }
        });
    }
}

impl LineVisitor<'_> {
    /// An integer in decimal, as `Debug` writes it, without the
    /// formatting machinery.
    fn record_integer(&mut self, field: &Field, negative: bool, magnitude: u64) {
        if self.result.is_err() {
            return;
        }
        self.result = self.start(field).and_then(|()| {
            let mut digits = [0u8; 20];
            let mut at = digits.len();
            let mut rest = magnitude;
            loop {
                at -= 1;
                digits[at] = b'0' + (rest % 10) as u8;
                rest /= 10;
                if rest == 0 {
                    break;
                }
            }
            if negative {
                self.writer.write_char('-')?;
            }
            self.writer
                .write_str(std::str::from_utf8(&digits[at..]).unwrap_or("0"))
        });
    }
}

impl VisitOutput<fmt::Result> for LineVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for LineVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.writer
    }
}

/// Writes text with the control characters a terminal could act on (ESC,
/// BEL, BS, FF, DEL, and C1) escaped, as tracing-subscriber escapes a
/// message; runs without them are written whole.
struct Escaping<W>(W);

impl<W: fmt::Write> fmt::Write for Escaping<W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let mut run = 0;
        for (at, ch) in text.char_indices() {
            let escaped = matches!(ch, '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f')
                || ('\u{80}'..='\u{9f}').contains(&ch);
            if escaped {
                self.0.write_str(&text[run..at])?;
                if ch.is_ascii() {
                    write!(self.0, "\\x{:02x}", u32::from(ch))?;
                } else {
                    write!(self.0, "\\u{{{:x}}}", u32::from(ch))?;
                }
                run = at + ch.len_utf8();
            }
        }
        self.0.write_str(&text[run..])
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek};

    use super::*;

    /// The lines `log` writes through the default formatter's fields and
    /// through [`LineFields`].
    fn both(log: impl Fn()) -> (String, String) {
        let line = |fields: bool| {
            let mut file = tempfile::tempfile().expect("a file");
            let builder = tracing_subscriber::fmt()
                .with_writer(file.try_clone().expect("the file again"))
                .with_ansi(false)
                .without_time();
            let dispatch = if fields {
                tracing::Dispatch::new(builder.fmt_fields(LineFields).finish())
            } else {
                tracing::Dispatch::new(builder.finish())
            };
            tracing::dispatcher::with_default(&dispatch, &log);
            let mut text = String::new();
            file.rewind().expect("rewind");
            file.read_to_string(&mut text).expect("the lines");
            text
        };
        (line(false), line(true))
    }

    /// An error with a source.
    #[derive(Debug)]
    struct Caused(std::io::Error);

    impl fmt::Display for Caused {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("could not write")
        }
    }

    impl std::error::Error for Caused {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn lines_are_written_as_the_default_formatter_writes_them() {
        let (default, ours) = both(|| {
            let span = tracing::info_span!("request", request_id = "req_1");
            let _entered = span.enter();
            tracing::info!(
                request_id = "req_1",
                method = %"POST",
                route = "/v1/chat/completions",
                status = 200_u16,
                code = Some("none"),
                client = "a \"quoted\" name\\",
                model = "caf\u{e9}",
                upstream_ms = Some(1.5_f64),
                tokens = 42_u64,
                none = 0_u64,
                most = u64::MAX,
                below = -17_i64,
                least = i64::MIN,
                complete = true,
                incomplete = false,
                r#type = "x",
                "request"
            );
            tracing::warn!(wait = ?std::time::Duration::from_millis(3), "spend log: {} then \x1b[31mred\u{9b} end", "one");
            tracing::error!("plain");
            let cause = std::io::Error::other("the disk is full");
            let error = std::io::Error::other(Caused(cause));
            tracing::error!(
                error = &error as &(dyn std::error::Error + 'static),
                after = 1_u64,
                "failed"
            );
        });
        assert_eq!(ours, default);
        assert!(
            ours.contains("client=\"a \\\"quoted\\\" name\\\\\""),
            "{ours}"
        );
        assert!(ours.contains("\\x1b[31mred\\u{9b} end"), "{ours}");
        assert!(
            ours.contains("error.sources=[the disk is full] after=1"),
            "{ours}"
        );
        assert_eq!(ours.lines().count(), 4, "{ours}");
    }
}
