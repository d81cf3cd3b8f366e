//! A request body as it goes upstream, in pieces: the JSON Iris wrote, with
//! large strings it did not have to copy spliced in between (a data URI
//! the image cache holds, a client's data URI still in the received body).
//! The pieces are sent one after another, never joined: a 7 MB data URI is
//! not copied into a 7 MB body per request.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};

/// Strings at least this long are spliced rather than copied: below it the
/// copy is cheaper than one more piece for the connection to write.
pub const SPLICE_MIN_BYTES: usize = 16 * 1024;

/// A request body of one or more pieces, with its exact length (sent as
/// `Content-Length`).
#[derive(Debug, Clone, Default)]
pub struct SplicedBody {
    pieces: VecDeque<Bytes>,
    len: usize,
}

impl SplicedBody {
    /// `written`, with each `(offset, piece)` of `splices` (in order of
    /// offset, each within `written`) put in at its offset.
    pub fn new(written: Vec<u8>, splices: Vec<(usize, Bytes)>) -> Self {
        let written = Bytes::from(written);
        let mut body = Self::default();
        let mut from = 0;
        for (at, piece) in splices {
            body.push(written.slice(from..at));
            body.push(piece);
            from = at;
        }
        body.push(written.slice(from..));
        body
    }

    fn push(&mut self, piece: Bytes) {
        if !piece.is_empty() {
            self.len += piece.len();
            self.pieces.push_back(piece);
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many pieces it is sent in.
    pub fn pieces(&self) -> usize {
        self.pieces.len()
    }

    /// The whole body in one buffer: a copy unless it is one piece (for
    /// what reads it rather than sends it, like the demo upstream).
    pub fn to_bytes(&self) -> Bytes {
        match self.pieces.len() {
            0 => Bytes::new(),
            1 => self.pieces[0].clone(),
            _ => {
                let mut whole = BytesMut::with_capacity(self.len);
                for piece in &self.pieces {
                    whole.extend_from_slice(piece);
                }
                whole.freeze()
            }
        }
    }
}

impl From<Bytes> for SplicedBody {
    fn from(bytes: Bytes) -> Self {
        let mut body = Self::default();
        body.push(bytes);
        body
    }
}

impl From<Vec<u8>> for SplicedBody {
    fn from(bytes: Vec<u8>) -> Self {
        Self::from(Bytes::from(bytes))
    }
}

impl http_body::Body for SplicedBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        Poll::Ready(this.pieces.pop_front().map(|piece| {
            this.len -= piece.len();
            Ok(Frame::data(piece))
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.pieces.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len as u64)
    }
}

/// Whether `part` lies inside `whole`'s memory (a string borrowed from a
/// received body, say).
pub fn within(whole: &[u8], part: &[u8]) -> bool {
    let (whole, part) = (whole.as_ptr_range(), part.as_ptr_range());
    whole.start <= part.start && part.end <= whole.end
}

/// `part` as a slice of `whole`, sharing its memory, when it lies in it.
pub fn slice_of(whole: &Bytes, part: &[u8]) -> Option<Bytes> {
    within(whole, part).then(|| whole.slice_ref(part))
}

/// A string shared with the image cache, as a piece of a body: the body
/// holds the `Arc`, so the string is neither copied nor freed while sent.
pub fn shared_piece(text: &Arc<String>) -> Bytes {
    struct Shared(Arc<String>);
    impl AsRef<[u8]> for Shared {
        fn as_ref(&self) -> &[u8] {
            self.0.as_bytes()
        }
    }
    Bytes::from_owner(Shared(Arc::clone(text)))
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    #[tokio::test]
    async fn pieces_are_sent_in_order_with_the_exact_length() {
        let shared = Arc::new("SHARED".to_owned());
        let body = SplicedBody::new(
            b"{\"a\":\"\",\"b\":\"\"}".to_vec(),
            vec![
                (6, shared_piece(&shared)),
                (13, Bytes::from_static(b"received")),
            ],
        );
        let expected = "{\"a\":\"SHARED\",\"b\":\"received\"}";
        assert_eq!(body.len(), expected.len());
        assert_eq!(body.pieces(), 5);
        assert_eq!(
            http_body::Body::size_hint(&body).exact(),
            Some(expected.len() as u64)
        );
        assert_eq!(body.to_bytes(), expected.as_bytes());
        let sent = body.collect().await.expect("infallible").to_bytes();
        assert_eq!(sent, expected.as_bytes());
    }

    #[test]
    fn empty_pieces_are_left_out() {
        let body = SplicedBody::new(b"\"\"".to_vec(), vec![(0, Bytes::new()), (2, Bytes::new())]);
        assert_eq!(body.pieces(), 1);
        assert_eq!(SplicedBody::from(Bytes::new()).pieces(), 0);
        assert!(http_body::Body::is_end_stream(&SplicedBody::default()));
    }
}
