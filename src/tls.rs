//! TLS for the connections Iris opens itself (upstreams over HTTPS, the
//! PostgreSQL spend log): rustls with ring, the platform's roots, and an
//! operator's private CA beside them (`upstreams[].ca_file`,
//! `spend_log.ca_file`).
//!
//! A private CA is read and checked once, when the config is resolved, so
//! `iris check` refuses a missing or unparsable file at its key path and a
//! running server never meets one.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ClientConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

/// The certificates of a PEM file trusted as roots beside the platform's,
/// for one upstream or the spend log's database.
#[derive(Clone)]
pub struct PrivateCa {
    path: PathBuf,
    certs: Arc<[CertificateDer<'static>]>,
    /// SHA-256 over the certificates: two files with the same certificates
    /// are one CA set (one pooled client), and a changed file is another.
    id: [u8; 32],
}

impl PrivateCa {
    /// Reads `path`: one or more PEM certificates (`BEGIN CERTIFICATE`),
    /// each usable as a trust anchor. The error says what is wrong, for
    /// `iris check`.
    pub fn load(path: &Path) -> Result<Self, String> {
        let pem =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut certs = Vec::new();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| format!("{} is not valid PEM: {e}", path.display()))?;
            // What rustls will do with it: a certificate that is no trust
            // anchor would only fail later, at the first handshake.
            webpki_anchor(&cert).map_err(|e| {
                format!(
                    "{}: certificate {} is not a usable CA certificate: {e}",
                    path.display(),
                    certs.len() + 1
                )
            })?;
            certs.push(cert);
        }
        if certs.is_empty() {
            return Err(format!(
                "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                path.display()
            ));
        }
        let mut digest = Sha256::new();
        for cert in &certs {
            digest.update((cert.len() as u64).to_be_bytes());
            digest.update(cert);
        }
        Ok(Self {
            path: path.to_path_buf(),
            certs: certs.into(),
            id: digest.finalize().into(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn certs(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }

    /// Equal for equal certificates, whatever file they came from.
    pub fn id(&self) -> [u8; 32] {
        self.id
    }
}

fn webpki_anchor(cert: &CertificateDer<'_>) -> Result<(), String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).map_err(|e| e.to_string())
}

impl PartialEq for PrivateCa {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id && self.path == other.path
    }
}

impl Eq for PrivateCa {}

impl fmt::Debug for PrivateCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateCa")
            .field("path", &self.path)
            .field("certs", &self.certs.len())
            .finish_non_exhaustive()
    }
}

/// The crypto Iris's TLS uses, whatever default the process installed.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client config that checks the server's certificate against the
/// platform's roots and `ca`'s, and its name against the host connected to.
pub fn verified(ca: Option<&PrivateCa>) -> Result<ClientConfig, String> {
    let provider = provider();
    let extra = ca.map(|ca| ca.certs().to_vec()).unwrap_or_default();
    let verifier =
        rustls_platform_verifier::Verifier::new_with_extra_roots(extra, Arc::clone(&provider))
            .map_err(|e| format!("TLS roots: {e}"))?;
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}

/// A client config that encrypts without checking who answers: what
/// PostgreSQL's `sslmode=require` (and `prefer`) mean. The handshake's
/// signatures are still checked, so the key exchange is with whoever holds
/// the presented certificate's key; only who that is goes unchecked.
pub fn unverified() -> Result<ClientConfig, String> {
    let provider = provider();
    Ok(ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth())
}

/// Accepts any certificate (see [`unverified`]).
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        file
    }

    #[test]
    fn a_missing_empty_or_garbled_file_is_refused_with_what_is_wrong() {
        let missing = PrivateCa::load(Path::new("/nonexistent/ca.pem")).unwrap_err();
        assert!(missing.contains("cannot read"), "{missing}");
        let empty = PrivateCa::load(file("no certificate here\n").path()).unwrap_err();
        assert!(empty.contains("holds no PEM certificate"), "{empty}");
        let garbled = PrivateCa::load(
            file("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
                .path(),
        )
        .unwrap_err();
        assert!(garbled.contains("not a usable CA certificate"), "{garbled}");
    }

    fn ca_pem() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn a_ca_file_is_its_certificates_wherever_it_lies() {
        let (one, other) = (ca_pem(), ca_pem());
        let both = PrivateCa::load(file(&format!("{one}{other}")).path()).unwrap();
        assert_eq!(both.certs().len(), 2);
        let copy = PrivateCa::load(file(&format!("{one}{other}")).path()).unwrap();
        assert_eq!(both.id(), copy.id(), "same certificates, one CA set");
        let single = PrivateCa::load(file(&one).path()).unwrap();
        assert_ne!(both.id(), single.id());
        assert!(verified(Some(&single)).is_ok());
    }

    #[test]
    fn both_configs_build() {
        assert!(unverified().is_ok());
        // The platform's roots may be missing on a bare machine; a private
        // CA alone is enough then, and its absence an error, not a panic.
        let _ = verified(None);
    }
}
