//! Writing a request as it goes upstream: every field as received, but for
//! those Iris replaced, with no re-serialization of the rest.

use super::{ChatRequest, Content, ImagePart, Message, Part, PartKind};
use crate::openai::raw;

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
        self.body.write_with(&mut out, |key, out| {
            if key != "messages" {
                return false;
            }
            out.push(b'[');
            for (i, message) in self.messages.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                message.write(out);
            }
            out.push(b']');
            true
        });
        out
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

    fn write(&self, out: &mut Vec<u8>) {
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
                        part.write(out);
                    }
                    out.push(b']');
                }
            }
            true
        });
    }
}

impl Part<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        self.fields
            .write_with(out, |key, out| match (key, &self.kind) {
                ("image_url", PartKind::Image(image)) => {
                    image.write(out);
                    true
                }
                _ => false,
            });
    }
}

impl ImagePart<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        self.fields.write_with(out, |key, out| {
            if key != "url" {
                return false;
            }
            raw::write_json_string(out, &self.url);
            true
        });
    }
}
