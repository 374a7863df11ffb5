//! A certificate authority for one Ferry cluster (rcgen): `ferry certs`
//! makes one for a real install, `ferry dev`, `ferry demo` and the tests a
//! throwaway one in their temporary directory. Nothing here is built into
//! the binary: every CA is made at run time and lives in files its owner
//! keeps.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

use crate::credentials::Files;
use crate::identity::Identity;
use crate::Error;

/// How long a CA made here is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a certificate issued here is valid unless asked otherwise.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// A CA: its certificate and key, as PEM.
pub struct Authority {
    cert_pem: String,
    key_pem: String,
}

/// A certificate and its key, as PEM.
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
}

fn issue_error(e: impl std::fmt::Display) -> Error {
    Error::Issue(e.to_string())
}

/// Writes `bytes` to `path` readable by its owner only when `private`.
pub fn write_file(path: &Path, bytes: &[u8], private: bool) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| Error::Read { what: "writing", path: path.display().to_string(), source };
    // Written beside the target and renamed over it: a process watching
    // the file never reads half of it.
    let staging = path.with_extension("pem.new");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&staging)
        .map_err(io)?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(io)?;
    std::fs::rename(&staging, path).map_err(io)
}

impl Authority {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str) -> Result<Self, Error> {
        let key = KeyPair::generate().map_err(issue_error)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, format!("Ferry CA {name}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + CA_VALIDITY;
        let cert = params.self_signed(&key).map_err(issue_error)?;
        Ok(Self { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// A CA from its certificate and key files.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, Error> {
        let read = |what, path: &Path| {
            std::fs::read_to_string(path).map_err(|source| Error::Read {
                what,
                path: path.display().to_string(),
                source,
            })
        };
        let authority = Self { cert_pem: read("CA certificate", cert)?, key_pem: read("CA key", key)? };
        authority.issuer()?;
        Ok(authority)
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, Error> {
        let key = KeyPair::from_pem(&self.key_pem).map_err(|e| Error::Issue(format!("the CA key: {e}")))?;
        Issuer::from_ca_cert_pem(&self.cert_pem, key).map_err(|e| Error::Issue(format!("the CA certificate: {e}")))
    }

    /// The CA's certificate, which every holder trusts.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's key: whoever holds it can issue certificates.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// A certificate for `identity`, valid for [`DEFAULT_VALIDITY`], with
    /// `hosts` (names or IP addresses) as further names a client may check.
    pub fn issue(&self, identity: &Identity, hosts: &[String]) -> Result<Issued, Error> {
        let now = OffsetDateTime::now_utc();
        self.issue_between(identity, hosts, now - time::Duration::minutes(5), now + DEFAULT_VALIDITY)
    }

    /// A certificate for `identity` valid from `not_before` to `not_after`.
    pub fn issue_between(
        &self,
        identity: &Identity,
        hosts: &[String],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Issued, Error> {
        let key = KeyPair::generate().map_err(issue_error)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, identity.to_string());
        let uri = identity.uri().try_into().map_err(issue_error)?;
        params.subject_alt_names.push(SanType::URI(uri));
        if let Some(role) = identity.role() {
            params.subject_alt_names.push(SanType::DnsName(role.server_name().try_into().map_err(issue_error)?));
            params.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        for host in hosts {
            let san = match host.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => {
                    SanType::DnsName(host.clone().try_into().map_err(|e| Error::Issue(format!("host '{host}': {e}")))?)
                }
            };
            params.subject_alt_names.push(san);
        }
        params.extended_key_usages.push(ExtendedKeyUsagePurpose::ClientAuth);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.signed_by(&key, &self.issuer()?).map_err(issue_error)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// Writes `ca.pem` and `ca-key.pem` (owner-only) into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(PathBuf, PathBuf), Error> {
        let (cert, key) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
        write_file(&cert, self.cert_pem.as_bytes(), false)?;
        write_file(&key, self.key_pem.as_bytes(), true)?;
        Ok((cert, key))
    }

    /// Issues a certificate for `identity` and writes it, its key
    /// (owner-only) and the CA's certificate into `dir`, named by the
    /// identity (`scheduler-1.pem`, `scheduler-1-key.pem`, `ca.pem`).
    pub fn write_holder(&self, dir: &Path, identity: &Identity, hosts: &[String]) -> Result<Files, Error> {
        let issued = self.issue(identity, hosts)?;
        let stem = file_stem(identity);
        let files = Files {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}-key.pem")),
        };
        std::fs::create_dir_all(dir).map_err(|source| Error::Read {
            what: "creating",
            path: dir.display().to_string(),
            source,
        })?;
        write_file(&files.ca, self.cert_pem.as_bytes(), false)?;
        write_file(&files.key, issued.key_pem.as_bytes(), true)?;
        write_file(&files.cert, issued.cert_pem.as_bytes(), false)?;
        Ok(files)
    }
}

/// The file name (without `.pem`) of an identity's certificate.
pub fn file_stem(identity: &Identity) -> String {
    match identity {
        Identity::Scheduler(id) => format!("scheduler-{id}"),
        Identity::Worker(name) => format!("worker-{name}"),
        Identity::User(name) => format!("user-{name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_issued_certificate_names_its_identity_and_a_reloaded_ca_issues_too() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::new("t").unwrap();
        let (cert, key) = ca.write(dir.path()).unwrap();
        let again = Authority::load(&cert, &key).unwrap();
        let issued = again.issue(&Identity::Scheduler(2), &["10.0.0.2".into(), "s2.example".into()]).unwrap();
        let der = rustls_pki_types::CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        let (identity, not_after) = Identity::of_certificate(&der).unwrap();
        assert_eq!(identity, Identity::Scheduler(2));
        assert!(not_after > OffsetDateTime::now_utc().unix_timestamp() + 300 * 24 * 3600);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(Authority::load(&cert, &dir.path().join("missing")).is_err());
    }

    use rustls_pki_types::pem::PemObject;
}
