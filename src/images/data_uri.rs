//! `data:` URIs as RFC 2397 defines them: `data:[<mediatype>][;base64],<data>`.
//! The one parser every part of Iris uses (validation, the budget estimate,
//! the rewrite), so all of them agree on what a data URI is: the scheme and
//! the `;base64` marker are case-insensitive, the media type is compared
//! without regard to case, and parameters (`;charset=…`, `;name=…`) are
//! allowed between them.

/// A data URI's parts, borrowed from the URI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataUri<'a> {
    /// As declared, without parameters; empty when none was given
    /// (RFC 2397's default is `text/plain`).
    pub media_type: &'a str,
    /// Whether the data is base64 (`;base64`), else percent-encoded text.
    pub base64: bool,
    /// Everything after the first comma.
    pub data: &'a str,
}

/// Why a text is not a data URI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DataUriError {
    #[error("it does not start with data:")]
    NotData,
    #[error("it has no comma before the data")]
    NoComma,
}

/// Whether `url` has the `data:` scheme (in any case).
pub fn is_data_uri(url: &str) -> bool {
    url.get(..5)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("data:"))
}

impl<'a> DataUri<'a> {
    pub fn parse(uri: &'a str) -> Result<Self, DataUriError> {
        if !is_data_uri(uri) {
            return Err(DataUriError::NotData);
        }
        let (header, data) = uri[5..].split_once(',').ok_or(DataUriError::NoComma)?;
        let mut params = header.split(';');
        let media_type = params.next().unwrap_or("").trim();
        // `;base64` is the last parameter when present (RFC 2397's grammar).
        let base64 = header
            .rsplit(';')
            .next()
            .is_some_and(|last| header.contains(';') && last.trim().eq_ignore_ascii_case("base64"));
        Ok(Self {
            media_type,
            base64,
            data,
        })
    }

    /// Whether the declared media type is `mime`, ignoring case.
    pub fn declares(&self, mime: &str) -> bool {
        self.media_type.eq_ignore_ascii_case(mime)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(uri: &str) -> Option<(&str, bool, &str)> {
        DataUri::parse(uri)
            .ok()
            .map(|d| (d.media_type, d.base64, d.data))
    }

    #[test]
    fn follows_rfc_2397_with_any_case() {
        assert_eq!(
            parse("data:image/png;base64,AAAA"),
            Some(("image/png", true, "AAAA"))
        );
        assert_eq!(
            parse("DATA:Image/PNG;name=x.png;BASE64,AAAA"),
            Some(("Image/PNG", true, "AAAA"))
        );
        assert_eq!(parse("Data:;base64,AAAA"), Some(("", true, "AAAA")));
        assert_eq!(
            parse("data:text/plain;charset=utf-8,hi%20there"),
            Some(("text/plain", false, "hi%20there"))
        );
        assert_eq!(parse("data:,x"), Some(("", false, "x")));
        assert_eq!(parse("data:base64,x"), Some(("base64", false, "x")));
        assert_eq!(
            parse("data:image/png;base64,"),
            Some(("image/png", true, ""))
        );
        assert!(DataUri::parse("data:image/png;base64,A").is_ok_and(|d| d.declares("IMAGE/png")));
    }

    #[test]
    fn refuses_what_is_not_a_data_uri() {
        assert_eq!(DataUri::parse("dat"), Err(DataUriError::NotData));
        assert_eq!(
            DataUri::parse("https://x/a.png"),
            Err(DataUriError::NotData)
        );
        assert_eq!(
            DataUri::parse("data:image/png;base64"),
            Err(DataUriError::NoComma)
        );
        // Multi-byte text where the scheme would be must not panic.
        assert_eq!(DataUri::parse("dät:x,y"), Err(DataUriError::NotData));
        assert!(!is_data_uri("é"));
        assert!(is_data_uri("DaTa:x"));
    }
}
