//! Writing a request as it goes upstream: every field as received, but for
//! those Iris replaced, with no re-serialization of the rest; and as the
//! response cache keys it.

use super::{ChatRequest, Content, ImageAt, ImagePart, Message, Part, PartKind};
use crate::openai::raw;

/// The top-level fields that do not change an answer, left out of the
/// cache's text: how it is delivered, and who the client says its user is.
pub const NOT_IN_CACHE_KEY: &[&str] = &["stream", "stream_options", "user"];

/// What an image's URL is written as: `None` keeps the URL.
type UrlFor<'f> = &'f mut dyn FnMut(ImageAt) -> Option<String>;

impl ChatRequest<'_> {
    /// Writes the request as it should go upstream.
    pub fn to_body(&self) -> Vec<u8> {
        // Sized once: with megabytes of inlined images, regrowing means
        // touching fresh pages again and again.
        let replaced: usize = self
            .images()
            .filter(|(_, image)| image.changed)
            .map(|(_, image)| image.url.len() + 2)
            .sum();
        let mut out = Vec::with_capacity(self.body_len + replaced + 256);
        self.write_into(&mut out, &[], &mut |_| None);
        out
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
        self.write_into(&mut out, NOT_IN_CACHE_KEY, url_for);
        out
    }

    fn write_into(&self, out: &mut Vec<u8>, omit: &[&str], url_for: UrlFor<'_>) {
        self.body.write_without(out, omit, |key, out| {
            if key != "messages" {
                return false;
            }
            out.push(b'[');
            for (i, message) in self.messages.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                message.write(out, i, url_for);
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

    fn write(&self, out: &mut Vec<u8>, message: usize, url_for: UrlFor<'_>) {
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
                        part.write(out, ImageAt { message, part: j }, url_for);
                    }
                    out.push(b']');
                }
            }
            true
        });
    }
}

impl Part<'_> {
    fn write(&self, out: &mut Vec<u8>, at: ImageAt, url_for: UrlFor<'_>) {
        self.fields
            .write_with(out, |key, out| match (key, &self.kind) {
                ("image_url", PartKind::Image(image)) => {
                    image.write(out, url_for(at).as_deref());
                    true
                }
                _ => false,
            });
    }
}

impl ImagePart<'_> {
    /// Writes the part, its URL as `url` when given.
    fn write(&self, out: &mut Vec<u8>, url: Option<&str>) {
        self.fields.write_with(out, |key, out| {
            if key != "url" {
                return false;
            }
            raw::write_json_string(out, url.unwrap_or(&self.url));
            true
        });
    }
}
