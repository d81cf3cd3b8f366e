//! Writing a request as it goes upstream: every field as received, but for
//! those Iris replaced, with no re-serialization of the rest; and as the
//! response cache keys it.

use bytes::Bytes;

use super::{ChatRequest, Content, ImageAt, ImagePart, Message, Part, PartKind};
use crate::openai::raw;
use crate::openai::spliced::SplicedBody;

/// The top-level fields that do not change an answer, left out of the
/// cache's text: how it is delivered, and who the client says its user is.
pub const NOT_IN_CACHE_KEY: &[&str] = &["stream", "stream_options", "user"];

/// What an image's URL is written as: `None` keeps the URL.
type UrlFor<'f> = &'f mut dyn FnMut(ImageAt) -> Option<String>;

/// How image URLs are written.
enum Urls<'f> {
    /// As they go upstream: a long URL is spliced in by reference (the
    /// image cache's data URI, or the client's own in `received`), not
    /// copied; the pieces go in `splices`, at their offsets in the text.
    Upstream {
        received: &'f Bytes,
        splices: Vec<(usize, Bytes)>,
    },
    /// As the cache keys them: replaced by what `url_for` gives.
    Keyed(UrlFor<'f>),
}

impl ChatRequest<'_> {
    /// Writes the request as it should go upstream; `received` is the body
    /// it was parsed from, whose long strings are sent from there.
    pub fn to_body(&self, received: &Bytes) -> SplicedBody {
        let mut urls = Urls::Upstream {
            received,
            splices: Vec::new(),
        };
        // Sized once for what is copied: the body as received less the
        // URLs spliced from it, plus the replacements that are not.
        let (mut spliced, mut copied) = (0, 0);
        for (_, image) in self.images() {
            match (image.url.is_spliced(received), image.changed) {
                (true, false) => spliced += image.url.len(),
                (false, true) => copied += image.url.len() + 2,
                _ => {}
            }
        }
        let mut out = Vec::with_capacity(self.body_len - spliced.min(self.body_len) + copied + 256);
        self.write_into(&mut out, &[], &mut urls);
        let splices = match urls {
            Urls::Upstream { splices, .. } => splices,
            Urls::Keyed(_) => Vec::new(),
        };
        SplicedBody::new(out, splices)
    }

    /// The request as the response cache keys it: without the fields of
    /// [`NOT_IN_CACHE_KEY`], and each image's URL replaced by what
    /// `url_for` gives for it (where it gives something).
    pub fn to_cache_text(&self, url_for: UrlFor<'_>) -> Vec<u8> {
        // Sized for the text without its image URLs (data URIs may be most
        // of it), plus room for what replaces them.
        let urls: usize = self.images().map(|(_, image)| image.url.len()).sum();
        let mut out =
            Vec::with_capacity(self.body_len.saturating_sub(urls) + 80 * self.image_count() + 64);
        self.write_into(&mut out, NOT_IN_CACHE_KEY, &mut Urls::Keyed(url_for));
        out
    }

    fn write_into(&self, out: &mut Vec<u8>, omit: &[&str], urls: &mut Urls<'_>) {
        self.body.write_without(out, omit, |key, out| {
            if key != "messages" {
                return false;
            }
            out.push(b'[');
            for (i, message) in self.messages.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                message.write(out, i, urls);
            }
            out.push(b']');
            true
        });
    }
}

impl Message<'_> {
    pub(super) fn changed(&self) -> bool {
        match &self.content {
            Content::Parts(parts) => parts
                .iter()
                .any(|p| matches!(&p.kind, PartKind::Image(i) if i.changed)),
            _ => false,
        }
    }

    fn write(&self, out: &mut Vec<u8>, message: usize, urls: &mut Urls<'_>) {
        self.fields.write_with(out, |key, out| {
            if key != "content" {
                return false;
            }
            match &self.content {
                Content::Absent | Content::Null => out.extend_from_slice(b"null"),
                Content::Text(text) => raw::write_json_string(out, text),
                Content::Parts(parts) => {
                    out.push(b'[');
                    for (j, part) in parts.iter().enumerate() {
                        if j > 0 {
                            out.push(b',');
                        }
                        part.write(out, ImageAt { message, part: j }, urls);
                    }
                    out.push(b']');
                }
            }
            true
        });
    }
}

impl Part<'_> {
    fn write(&self, out: &mut Vec<u8>, at: ImageAt, urls: &mut Urls<'_>) {
        self.fields
            .write_with(out, |key, out| match (key, &self.kind) {
                ("image_url", PartKind::Image(image)) => {
                    image.write(out, at, urls);
                    true
                }
                _ => false,
            });
    }
}

impl ImagePart<'_> {
    /// Writes the part, its URL as `urls` says.
    fn write(&self, out: &mut Vec<u8>, at: ImageAt, urls: &mut Urls<'_>) {
        self.fields.write_with(out, |key, out| {
            if key != "url" {
                return false;
            }
            match urls {
                Urls::Upstream { received, splices } => match self.url.piece(received) {
                    Some(piece) => {
                        out.push(b'"');
                        splices.push((out.len(), piece));
                        out.push(b'"');
                    }
                    None => raw::write_json_string(out, &self.url),
                },
                Urls::Keyed(url_for) => {
                    raw::write_json_string(out, url_for(at).as_deref().unwrap_or(&self.url));
                }
            }
            true
        });
    }
}
