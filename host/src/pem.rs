//! Certificate files an operator names for TLS (STARTTLS's certificate, a
//! Redis client certificate): read bounded, and a certificate chain checked
//! against its private key, with errors that name the file.
//!
//! rustls parses; what is here is only the reading and the wording, shared
//! by the two places that take a certificate and key pair, and the
//! certificate's expiry (`x509-parser` reads it: rustls does not say), put
//! where an operator's alert finds it.

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

/// Warned of at load, and again every [`REMINDER_INTERVAL`], when a
/// certificate has less than this left (Let's Encrypt renews at 30 days
/// left, so a certificate seen this close failed to renew twice or more).
pub const EXPIRY_WARNING_DAYS: i64 = 14;

/// Records when the certificate `chain[0]` (loaded from `path` for `role`,
/// `smtp` or `redis`) expires: the gauge
/// `greyhook_tls_certificate_expiry_timestamp_seconds{role}` an alert
/// compares with `time()`, and a warning in the log when it has expired or
/// expires within [`EXPIRY_WARNING_DAYS`].
pub(crate) fn note_expiry(role: &'static str, path: &Path, certified: &CertifiedKey) {
    let Some(not_after) = certified.cert.first().and_then(|c| not_after(c)) else {
        tracing::warn!("{}: the certificate's expiry cannot be read", path.display());
        return;
    };
    crate::telemetry::host().tls_expiry.get_or_create(&crate::telemetry::RoleLabel { role }).set(not_after);
    let path = path.display().to_string();
    if let Some(warning) = warning(&path, not_after, now()) {
        tracing::warn!("{warning}");
    }
    IN_USE.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(role, (path, not_after));
}

/// How often the certificates in use are looked at again for
/// [`remind`]: once a day, so a certificate that was fine at load but was
/// not renewed since is still warned of in the log, not only by the gauge.
pub const REMINDER_INTERVAL: std::time::Duration = std::time::Duration::from_secs(86_400);

/// Warns (in the log) of every certificate in use that has expired or
/// expires within [`EXPIRY_WARNING_DAYS`]; the daemon calls it every
/// [`REMINDER_INTERVAL`].
pub(crate) fn remind() {
    let now = now();
    for (_, path, not_after) in in_use() {
        if let Some(warning) = warning(&path, not_after, now) {
            tracing::warn!("{warning}");
        }
    }
}

/// The warning for the certificate in `path` expiring at `not_after`, seen
/// at `now` (both Unix seconds), if it needs one.
fn warning(path: &str, not_after: i64, now: i64) -> Option<String> {
    let days = days_between(now, not_after);
    if not_after <= now {
        Some(format!("{path}: the certificate expired {} day(s) ago; peers refuse it", (now - not_after) / 86_400))
    } else if days < EXPIRY_WARNING_DAYS {
        Some(format!("{path}: the certificate expires in {days} day(s); renew it (the renewed files are read without a restart)"))
    } else {
        None
    }
}

/// Now, Unix seconds.
fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Whole days from now to `not_after` (Unix seconds), negative once past.
pub(crate) fn days_left(not_after: i64) -> i64 {
    days_between(now(), not_after)
}

/// Whole days from `from` to `to` (Unix seconds), rounded down.
fn days_between(from: i64, to: i64) -> i64 {
    (to - from).div_euclid(86_400)
}

/// The certificates in use by role: the file and when it expires (Unix
/// seconds), for `greyhook status`. One entry a role, replaced at each load.
static IN_USE: std::sync::Mutex<std::collections::BTreeMap<&'static str, (String, i64)>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// The certificates in use: role, file, when it expires (Unix seconds).
pub(crate) fn in_use() -> Vec<(&'static str, String, i64)> {
    IN_USE.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().map(|(r, (p, t))| (*r, p.clone(), *t)).collect()
}

/// When a DER certificate expires, Unix seconds.
fn not_after(der: &CertificateDer<'_>) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    Some(cert.validity().not_after.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_is_read_from_the_certificate() {
        let mut params = rcgen::CertificateParams::new(vec!["greyhook.test".to_string()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2031, 5, 17);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(not_after(cert.der()), Some(1_936_742_400));
        assert_eq!(not_after(&CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00])), None, "not a certificate");
    }

    #[test]
    fn a_certificate_is_warned_of_from_fourteen_days_before_its_expiry() {
        let day = 86_400;
        let now = 1_900_000_000;
        assert_eq!(warning("c.pem", now + 30 * day, now), None);
        assert_eq!(warning("c.pem", now + 14 * day, now), None);
        assert_eq!(
            warning("c.pem", now + 14 * day - 1, now).as_deref(),
            Some("c.pem: the certificate expires in 13 day(s); renew it (the renewed files are read without a restart)")
        );
        assert!(warning("c.pem", now + 10, now).is_some_and(|w| w.contains("expires in 0 day(s)")));
        assert_eq!(
            warning("c.pem", now - 2 * day - 10, now).as_deref(),
            Some("c.pem: the certificate expired 2 day(s) ago; peers refuse it")
        );
    }
}
