//! STARTTLS's certificate, read from `tls_cert` and `tls_key` at start and
//! read again when either file changes.
//!
//! Certificates are renewed every few weeks (certbot, acme.sh, an internal
//! CA), and the tools replace the files and run a deploy hook. A daemon
//! that read them once would go on serving the old certificate until it
//! expired and senders' handshakes failed. Postfix picks a renewal up
//! because its smtpd processes are short-lived and read the files when
//! they start; greyhook looks at both files' metadata (one `stat` each) at
//! every handshake, which costs microseconds against the handshake's
//! milliseconds, and reads them again when anything changed. So no reload
//! signal, hook or restart is needed.
//!
//! A renewal is not atomic: the tools write the certificate and the key one
//! after the other. A pair that does not load (a file missing or cut short,
//! a key that does not match the certificate) is logged once and the
//! certificate in use is kept; the next change is tried again. Nothing a
//! client sends reaches this code: the files are the operator's.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::pem;
use crate::settings::FileWatch;

/// A TLS acceptor serving the certificate in `cert` with the key in `key`
/// (PEM), following changes to the files. An error names the file and
/// what is wrong with it.
pub(super) fn acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let files = CertFiles::load(cert, key)?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(files));
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The certificate files and the pair last loaded from them.
#[derive(Debug)]
struct CertFiles {
    cert: PathBuf,
    key: PathBuf,
    watch: FileWatch,
    current: ArcSwap<CertifiedKey>,
}

impl CertFiles {
    /// Reads both files; at start an error is fatal.
    fn load(cert: &Path, key: &Path) -> Result<CertFiles, String> {
        let watch = FileWatch::new(vec![cert.to_path_buf(), key.to_path_buf()]);
        let certified = read_pair(cert, key)?;
        Ok(CertFiles { cert: cert.to_path_buf(), key: key.to_path_buf(), watch, current: ArcSwap::from_pointee(certified) })
    }

    /// The pair to serve: the files read again if either changed since
    /// last looked at.
    fn serve(&self) -> Arc<CertifiedKey> {
        if self.watch.changed() {
            match read_pair(&self.cert, &self.key) {
                Ok(certified) => {
                    tracing::info!(cert = %self.cert.display(), "TLS: the changed certificate is served from now on");
                    self.current.store(Arc::new(certified));
                }
                Err(e) => tracing::warn!("{e}; the certificate in use is kept until the files change again"),
            }
        }
        self.current.load_full()
    }
}

impl ResolvesServerCert for CertFiles {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.serve())
    }
}

/// Reads a certificate chain and its private key, checking that they
/// belong together.
fn read_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let tls = |e: String| format!("TLS: {e}");
    let (cert_pem, key_pem) = (pem::read(cert).map_err(tls)?, pem::read(key).map_err(tls)?);
    let certified = pem::pair(cert, &cert_pem, key, &key_pem).map_err(tls)?;
    pem::note_expiry("smtp", cert, &certified);
    Ok(certified)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new self-signed pair for `name` written into `dir`; the
    /// certificate's DER.
    fn write_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf, Vec<u8>) {
        let c = rcgen::generate_simple_self_signed(vec![format!("{name}.test")]).unwrap();
        let (cert, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
        std::fs::write(&cert, c.cert.pem()).unwrap();
        std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
        (cert, key, c.cert.der().to_vec())
    }

    fn served(f: &CertFiles) -> Vec<u8> {
        f.serve().cert[0].to_vec()
    }

    #[test]
    fn a_changed_pair_is_served_and_a_broken_one_keeps_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, first) = write_pair(dir.path(), "one");
        let f = CertFiles::load(&cert, &key).unwrap();
        assert_eq!(served(&f), first);
        // Renewed by renaming new files over the old ones.
        let (c2, k2, second) = write_pair(dir.path(), "two");
        std::fs::rename(&c2, &cert).unwrap();
        std::fs::rename(&k2, &key).unwrap();
        assert_eq!(served(&f), second);
        // Half a renewal: the certificate is new, the key still the old.
        let (c3, k3, third) = write_pair(dir.path(), "three");
        std::fs::rename(&c3, &cert).unwrap();
        assert_eq!(served(&f), second, "a certificate without its key is not served");
        std::fs::rename(&k3, &key).unwrap();
        assert_eq!(served(&f), third, "the key's arrival completes the pair");
        // Cut short, then missing: the pair in use stays.
        std::fs::write(&cert, b"-----BEGIN CERTIFICATE-----\nMIIB").unwrap();
        assert_eq!(served(&f), third);
        std::fs::remove_file(&key).unwrap();
        assert_eq!(served(&f), third);
    }

    #[test]
    fn at_start_a_bad_pair_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, _) = write_pair(dir.path(), "one");
        let (_, other_key, _) = write_pair(dir.path(), "two");
        let e = CertFiles::load(&cert, &other_key).unwrap_err();
        assert!(e.contains("two.key is not the private key of the certificate in") && e.ends_with("one.crt"), "{e}");
        let e = CertFiles::load(&key, &key).unwrap_err();
        assert!(e.contains("holds no PEM certificate"), "{e}");
        let e = CertFiles::load(&cert, Path::new("/dev/zero")).unwrap_err();
        assert!(e.contains("/dev/zero") && e.contains("larger than"), "{e}");
    }
}
