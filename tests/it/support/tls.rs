//! Certificates for the TLS tests, made per test with rcgen: a private CA
//! (its PEM in a file, for a `ca_file`) and server certificates it signs.

use std::path::Path;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A certificate authority of the test's own, trusted by nothing else.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA's certificate, PEM.
    pub pem: String,
    file: tempfile::NamedTempFile,
}

/// A server's certificate (PEM) and its private key (PKCS#8 PEM).
pub struct ServerCert {
    pub cert_pem: String,
    pub key_pem: String,
    cert: CertificateDer<'static>,
    key: Vec<u8>,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("CA certificate");
        let pem = cert.pem();
        let file = tempfile::Builder::new()
            .suffix(".pem")
            .tempfile()
            .expect("CA file");
        std::fs::write(file.path(), &pem).expect("write CA file");
        Self {
            issuer: Issuer::new(params, key),
            pem,
            file,
        }
    }

    /// The CA's certificate in a PEM file, for a `ca_file`.
    pub fn file(&self) -> &Path {
        self.file.path()
    }

    /// A certificate for `names` (host names or IP addresses) signed by this CA.
    pub fn server_cert(&self, names: &[&str]) -> ServerCert {
        let key = KeyPair::generate().expect("server key");
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .expect("server params");
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("server"),
        );
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("server certificate");
        ServerCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert: cert.der().clone(),
            key: key.serialize_der(),
        }
    }
}

impl ServerCert {
    /// [`Self::server_config`] choosing HTTP/2 by ALPN.
    pub fn h2_server_config(&self) -> Arc<rustls::ServerConfig> {
        let mut config = Arc::unwrap_or_clone(self.server_config());
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }

    /// A rustls server config presenting this certificate.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone()));
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![self.cert.clone()], key)
        .expect("server TLS config");
        Arc::new(config)
    }
}
