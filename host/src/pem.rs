//! Certificate files an operator names for TLS (STARTTLS's certificate, a
//! Redis client certificate): read bounded, and a certificate chain checked
//! against its private key, with errors that name the file.
//!
//! rustls parses; what is here is only the reading and the wording, shared
//! by the two places that take a certificate and key pair.

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// The largest PEM file read: a certificate bundle is tens of kilobytes; a
/// larger file is a wrong path, not a certificate.
pub const MAX_PEM_BYTES: u64 = 1 << 20;

/// Reads a PEM file, at most [`MAX_PEM_BYTES`].
pub(crate) fn read(path: &Path) -> Result<Vec<u8>, String> {
    crate::settings::read_bounded(path, MAX_PEM_BYTES).map_err(|e| format!("{}: {e}", path.display()))
}

/// The certificate chain in `cert_pem` (from `cert`) with the private key
/// in `key_pem` (from `key`), checked to belong together.
pub(crate) fn pair(cert: &Path, cert_pem: &[u8], key: &Path, key_pem: &[u8]) -> Result<CertifiedKey, String> {
    let bad = |what: &Path, e: &dyn std::fmt::Display| format!("{}: {e}", what.display());
    let chain = CertificateDer::pem_slice_iter(cert_pem).collect::<Result<Vec<_>, _>>().map_err(|e| bad(cert, &e))?;
    if chain.is_empty() {
        return Err(bad(cert, &"holds no PEM certificate"));
    }
    let private = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| bad(key, &e))?;
    // `from_der` also checks that the key is the certificate's.
    CertifiedKey::from_der(chain, private, &rustls::crypto::ring::default_provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => {
            format!("{} is not the private key of the certificate in {}", key.display(), cert.display())
        }
        e => bad(key, &e),
    })
}
