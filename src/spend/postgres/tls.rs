//! The spend log's PostgreSQL connection over TLS: what the URL's `sslmode`
//! asks for, and tokio-postgres's TLS hook over tokio-rustls (the rustls
//! stack the upstream client uses; a dozen lines here rather than a crate
//! that would bring a second `sha2` and an X.509 parser along).
//!
//! - `disable`: never TLS.
//! - `prefer` (the default, as with libpq): TLS when the server offers it,
//!   without a certificate check; else plain.
//! - `require`: TLS or no connection; the certificate is not checked
//!   (encrypted, not authenticated), as libpq does without a root file.
//! - `verify-full`: TLS, the certificate checked against the platform's
//!   roots and `spend_log.ca_file`, and its name against the host. A server
//!   that fails the check is never sent a record.
//!
//! tokio-postgres knows only the first three, so `sslmode` is taken out of
//! the URL here and its mode set on the parsed config.
//!
//! No channel binding is offered (SCRAM without `-PLUS`): the binding's hash
//! depends on the certificate's signature algorithm, which would take an
//! X.509 parser to read, and a wrong guess would fail authentication.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::Socket;
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

use crate::tls::PrivateCa;

/// The `sslmode`s Iris knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Disable,
    Prefer,
    Require,
    VerifyFull,
}

impl TlsMode {
    fn parse(value: &str) -> Result<Self, String> {
        match value {
            "disable" => Ok(Self::Disable),
            "prefer" => Ok(Self::Prefer),
            "require" => Ok(Self::Require),
            "verify-full" => Ok(Self::VerifyFull),
            "verify-ca" => Err(
                "sslmode=verify-ca is not supported: use verify-full (it checks the \
                 certificate and the server's name)"
                    .into(),
            ),
            other => Err(format!(
                "sslmode={other} is not supported: use disable, prefer, require or verify-full"
            )),
        }
    }

    /// What tokio-postgres is told: whether TLS may, must or must not be
    /// used (the check of the certificate is the connector's).
    pub fn ssl_mode(self) -> SslMode {
        match self {
            Self::Disable => SslMode::Disable,
            Self::Prefer => SslMode::Prefer,
            Self::Require | Self::VerifyFull => SslMode::Require,
        }
    }
}

/// `url` without its `sslmode`, and the mode it asked for (the last one
/// given, as tokio-postgres reads repeated keys; `prefer` when none).
/// Both of tokio-postgres's forms: `postgres://…?sslmode=…` and
/// `key=value` pairs.
pub fn take_sslmode(url: &str) -> Result<(String, TlsMode), String> {
    let (rest, value) = match ["postgres://", "postgresql://"]
        .iter()
        .find(|prefix| url.starts_with(*prefix))
    {
        Some(_) => take_from_url(url),
        None => take_from_pairs(url)?,
    };
    let mode = match value {
        Some(value) => TlsMode::parse(&value)?,
        None => TlsMode::Prefer,
    };
    Ok((rest, mode))
}

/// From the URL form. Its query starts at the first `?` after the
/// credentials (tokio-postgres reads them up to the first `@`).
fn take_from_url(url: &str) -> (String, Option<String>) {
    let after_credentials = url.find('@').map_or(0, |at| at + 1);
    let Some(query_at) = url[after_credentials..]
        .find('?')
        .map(|i| after_credentials + i)
    else {
        return (url.to_owned(), None);
    };
    let mut mode = None;
    let kept: Vec<&str> = url[query_at + 1..]
        .split('&')
        .filter(|pair| match pair.split_once('=') {
            Some(("sslmode", value)) => {
                mode = Some(value.to_owned());
                false
            }
            _ => true,
        })
        .collect();
    let mut rest = url[..query_at].to_owned();
    if !kept.is_empty() {
        rest.push('?');
        rest.push_str(&kept.join("&"));
    }
    (rest, mode)
}

/// From `key=value` pairs: whitespace-separated, a value unquoted or in
/// single quotes, `\` escaping the next character in either.
fn take_from_pairs(text: &str) -> Result<(String, Option<String>), String> {
    let mut rest = String::with_capacity(text.len());
    let mut mode = None;
    let mut chars = text.char_indices().peekable();
    loop {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = chars.peek() else {
            break;
        };
        let mut key_end = start;
        while let Some((i, c)) = chars.next_if(|(_, c)| !c.is_whitespace() && *c != '=') {
            key_end = i + c.len_utf8();
        }
        let key = &text[start..key_end];
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        if chars.next_if(|(_, c)| *c == '=').is_none() {
            // Not a pair: tokio-postgres says what is wrong with it.
            return Ok((text.to_owned(), mode));
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        let quoted = chars.next_if(|(_, c)| *c == '\'').is_some();
        let mut end = text.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(escaped);
                    }
                }
                '\'' if quoted => {
                    end = i + 1;
                    break;
                }
                c if c.is_whitespace() && !quoted => {
                    end = i;
                    break;
                }
                c => value.push(c),
            }
        }
        if key == "sslmode" {
            mode = Some(value);
        } else {
            if !rest.is_empty() {
                rest.push(' ');
            }
            rest.push_str(&text[start..end]);
        }
    }
    Ok((rest, mode))
}

/// tokio-postgres's TLS hook: a rustls client config, shared by every
/// connection the sink opens.
#[derive(Clone)]
pub struct MakeRustls(Arc<rustls::ClientConfig>);

impl MakeRustls {
    /// The connector `mode` needs; `None` for `disable`.
    pub fn for_mode(mode: TlsMode, ca: Option<&PrivateCa>) -> Result<Option<Self>, String> {
        let config = match mode {
            TlsMode::Disable => return Ok(None),
            TlsMode::Prefer | TlsMode::Require => crate::tls::unverified()?,
            TlsMode::VerifyFull => crate::tls::verified(ca)?,
        };
        Ok(Some(Self(Arc::new(config))))
    }
}

impl MakeTlsConnect<Socket> for MakeRustls {
    type Stream = RustlsStream;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, io::Error> {
        // A Unix socket has no name (and PostgreSQL never offers TLS on
        // one): an invalid name fails only a handshake that is tried.
        Ok(RustlsConnect {
            name: ServerName::try_from(domain.to_owned()).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{domain:?} is no host name for TLS: {e}"),
                )
            }),
            config: Arc::clone(&self.0),
        })
    }
}

pub struct RustlsConnect {
    name: Result<ServerName<'static>, io::Error>,
    config: Arc<rustls::ClientConfig>,
}

impl TlsConnect<Socket> for RustlsConnect {
    type Stream = RustlsStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream>> + Send>>;

    fn connect(self, stream: Socket) -> Self::Future {
        Box::pin(async move {
            let connector = tokio_rustls::TlsConnector::from(self.config);
            let stream = connector.connect(self.name?, stream).await?;
            Ok(RustlsStream(stream))
        })
    }
}

/// A TLS session with the database.
pub struct RustlsStream(tokio_rustls::client::TlsStream<Socket>);

impl TlsStream for RustlsStream {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl AsyncRead for RustlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for RustlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_is_taken_out_of_either_form() {
        for (url, rest, mode) in [
            (
                "postgres://u:p@db/iris?sslmode=verify-full",
                "postgres://u:p@db/iris",
                TlsMode::VerifyFull,
            ),
            (
                "postgres://u:p@db/iris?options=-csearch_path%3Dx&sslmode=require&application_name=a",
                "postgres://u:p@db/iris?options=-csearch_path%3Dx&application_name=a",
                TlsMode::Require,
            ),
            // A `?` in the password is not the query.
            (
                "postgresql://u:p?w@db/iris?sslmode=disable",
                "postgresql://u:p?w@db/iris",
                TlsMode::Disable,
            ),
            ("postgres://db/iris", "postgres://db/iris", TlsMode::Prefer),
            (
                "host=db user=iris sslmode=verify-full dbname=iris",
                "host=db user=iris dbname=iris",
                TlsMode::VerifyFull,
            ),
            (
                "host=db password='a b\\' c' sslmode = 'require'",
                "host=db password='a b\\' c'",
                TlsMode::Require,
            ),
            ("host=db", "host=db", TlsMode::Prefer),
        ] {
            assert_eq!(take_sslmode(url).unwrap(), (rest.to_owned(), mode), "{url}");
        }
    }

    #[test]
    fn unknown_modes_are_refused_by_name() {
        for (url, says) in [
            ("postgres://db/iris?sslmode=verify-ca", "use verify-full"),
            (
                "postgres://db/iris?sslmode=allow",
                "sslmode=allow is not supported",
            ),
            ("host=db sslmode=strict", "sslmode=strict is not supported"),
        ] {
            let error = take_sslmode(url).unwrap_err();
            assert!(error.contains(says), "{url}: {error}");
        }
    }
}
