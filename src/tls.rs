//! TLS with rustls (ring provider): certificates from PEM files or a
//! generated development certificate, TLS 1.2 and 1.3 only, optional client
//! certificates. Everything that can be wrong with the files is found here,
//! at boot, and reported in one line.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::error::Error;

/// Whether clients must present a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAuth {
    None,
    /// `verify_mode: :peer`: asked for and verified against `ca`, optional.
    Optional(PathBuf),
    /// `verify_mode: :force_peer`: required and verified against `ca`.
    Required(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Certificate {
    /// PEM files: the whole chain in `cert`, the private key in `key`.
    Files { cert: PathBuf, key: PathBuf },
    /// A certificate for localhost generated at boot (development only).
    SelfSigned,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub certificate: Certificate,
    pub client_auth: ClientAuth,
}

fn tls_error(message: String) -> Error {
    Error::Tls(message)
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, Error> {
    fs::read(path).map_err(|e| tls_error(format!("cannot read the {what} {}: {e}", path.display())))
}

fn certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let pem = read(path, what)?;
    let chain = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            tls_error(format!(
                "the {what} {} is not valid PEM: {e}",
                path.display()
            ))
        })?;
    if chain.is_empty() {
        return Err(tls_error(format!(
            "the {what} {} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(chain)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    let pem = read(path, "TLS key")?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| {
            tls_error(format!(
                "the TLS key {} is not valid PEM: {e}",
                path.display()
            ))
        })?
        .ok_or_else(|| {
            tls_error(format!(
                "the TLS key {} holds no private key",
                path.display()
            ))
        })
}

/// Refuses a leaf certificate outside its validity period.
fn check_validity(leaf: &CertificateDer<'_>, path: &Path) -> Result<(), Error> {
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf).map_err(|e| {
        tls_error(format!(
            "the TLS certificate {} cannot be parsed: {e}",
            path.display()
        ))
    })?;
    let validity = parsed.validity();
    let now = x509_parser::time::ASN1Time::now();
    if validity.not_after < now {
        return Err(tls_error(format!(
            "the TLS certificate {} expired on {}",
            path.display(),
            validity.not_after
        )));
    }
    if validity.not_before > now {
        return Err(tls_error(format!(
            "the TLS certificate {} is not valid before {}",
            path.display(),
            validity.not_before
        )));
    }
    Ok(())
}

fn self_signed() -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), Error> {
    let names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    let generated = rcgen::generate_simple_self_signed(names)
        .map_err(|e| tls_error(format!("could not generate a development certificate: {e}")))?;
    let key = PrivateKeyDer::Pkcs8(generated.key_pair.serialize_der().into());
    Ok((vec![generated.cert.der().clone()], key))
}

/// Builds the acceptor, or says in one line what is wrong with the files.
pub fn acceptor(settings: &TlsSettings) -> Result<TlsAcceptor, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (chain, key) = match &settings.certificate {
        Certificate::Files { cert, key } => {
            let chain = certificates(cert, "TLS certificate")?;
            check_validity(&chain[0], cert)?;
            (chain, private_key(key)?)
        }
        Certificate::SelfSigned => self_signed()?,
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| tls_error(format!("TLS setup failed: {e}")))?;
    let builder = match &settings.client_auth {
        ClientAuth::None => builder.with_no_client_auth(),
        ClientAuth::Optional(ca) | ClientAuth::Required(ca) => {
            let mut roots = RootCertStore::empty();
            for certificate in certificates(ca, "TLS CA file")? {
                roots.add(certificate).map_err(|e| {
                    tls_error(format!(
                        "the TLS CA file {} has a bad certificate: {e}",
                        ca.display()
                    ))
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = match settings.client_auth {
                ClientAuth::Optional(_) => verifier.allow_unauthenticated(),
                _ => verifier,
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| tls_error(format!("client certificate verification: {e}")))?,
            )
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        let files = match &settings.certificate {
            Certificate::Files { cert, key } => {
                format!(" ({} and {})", cert.display(), key.display())
            }
            Certificate::SelfSigned => String::new(),
        };
        tls_error(format!(
            "the TLS key does not fit the certificate{files}: {e}"
        ))
    })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// PEM text of a DER certificate (for SSL_CLIENT_CERT in the env).
pub fn pem(der: &[u8]) -> String {
    let lf = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new("CERTIFICATE", der.to_vec()), lf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn self_signed_builds() {
        let settings = TlsSettings {
            certificate: Certificate::SelfSigned,
            client_auth: ClientAuth::None,
        };
        assert!(acceptor(&settings).is_ok());
    }

    #[test]
    fn file_errors_are_one_clear_line() {
        let dir = tempfile::tempdir().unwrap();
        let one = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = write(dir.path(), "cert.pem", &one.cert.pem());
        let key = write(dir.path(), "key.pem", &one.key_pair.serialize_pem());
        let wrong_key = write(dir.path(), "other.pem", &other.key_pair.serialize_pem());
        let garbage = write(dir.path(), "garbage.pem", "not pem at all");
        let files = |cert: &Path, key: &Path| TlsSettings {
            certificate: Certificate::Files {
                cert: cert.into(),
                key: key.into(),
            },
            client_auth: ClientAuth::None,
        };
        assert!(acceptor(&files(&cert, &key)).is_ok());
        let message = |s: TlsSettings| acceptor(&s).err().expect("should fail").to_string();
        assert!(message(files(&cert, &wrong_key)).contains("does not fit the certificate"));
        assert!(message(files(&dir.path().join("missing.pem"), &key))
            .contains("cannot read the TLS certificate"));
        assert!(message(files(&garbage, &key)).contains("holds no PEM certificate"));
        assert!(message(files(&cert, &garbage)).contains("holds no private key"));
        assert!(!message(files(&cert, &wrong_key)).contains('\n'));
    }

    #[test]
    fn pem_round_trips() {
        let der = b"not really a certificate".to_vec();
        let text = pem(&der);
        assert!(text.starts_with("-----BEGIN CERTIFICATE-----"));
        let back = rustls_pemfile::certs(&mut text.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(back.as_ref(), der.as_slice());
    }
}
