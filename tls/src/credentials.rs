//! A holder's credentials: the cluster CA, its own certificate chain and
//! key, read from PEM files and reloaded when they change on disk.
//!
//! [`Credentials`] keeps the rustls configurations built from the current
//! files; a server takes the current one for each connection it accepts and
//! a client for each connection it opens, so after a reload new connections
//! use the new certificates while open ones go on with the old (nothing is
//! dropped). A reload that fails (a file half written, a key not matching its
//! certificate) keeps the old credentials and says why.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::identity::Identity;
use crate::Error;

/// Where a holder's PEM files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Files {
    /// The cluster CA's certificate: whom to trust.
    pub ca: PathBuf,
    /// This holder's certificate (a chain, leaf first).
    pub cert: PathBuf,
    /// This holder's private key.
    pub key: PathBuf,
}

impl Files {
    /// The daemon flags that name these files (`--tls-ca FILE ...`).
    pub fn flags(&self) -> Vec<std::ffi::OsString> {
        [("--tls-ca", &self.ca), ("--tls-cert", &self.cert), ("--tls-key", &self.key)]
            .into_iter()
            .flat_map(|(flag, path)| [flag.into(), path.clone().into_os_string()])
            .collect()
    }

    /// The variables the CLI reads for these files (`FERRY_TLS_CA`, ...).
    pub fn env(&self) -> Vec<(&'static str, std::ffi::OsString)> {
        vec![
            ("FERRY_TLS_CA", self.ca.clone().into_os_string()),
            ("FERRY_TLS_CERT", self.cert.clone().into_os_string()),
            ("FERRY_TLS_KEY", self.key.clone().into_os_string()),
        ]
    }
}

/// How often [`Credentials::watch`] looks at the files.
pub const RELOAD_EVERY: Duration = Duration::from_secs(5);

/// Loaded credentials, reloadable; cheap to clone (clones share).
#[derive(Clone)]
pub struct Credentials {
    files: Files,
    current: Arc<RwLock<Loaded>>,
}

struct Loaded {
    identity: Identity,
    /// When the certificate expires, seconds since the Unix epoch.
    not_after: i64,
    /// A digest of the three files' bytes, to see a change.
    digest: blake3::Hash,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

/// The crypto Ferry uses: ring, TLS 1.3's suites.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read { what, path: path.display().to_string(), source })
}

fn pem_error(what: &'static str, path: &Path, reason: impl ToString) -> Error {
    Error::Pem { what, path: path.display().to_string(), reason: reason.to_string() }
}

fn certificates(what: &'static str, path: &Path, bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs =
        CertificateDer::pem_slice_iter(bytes).collect::<Result<Vec<_>, _>>().map_err(|e| pem_error(what, path, e))?;
    if certs.is_empty() {
        return Err(pem_error(what, path, "holds no PEM certificate"));
    }
    Ok(certs)
}

/// The three files' bytes and their digest.
struct Raw {
    ca: Vec<u8>,
    chain: Vec<u8>,
    key: Vec<u8>,
    digest: blake3::Hash,
}

impl Raw {
    fn read(files: &Files) -> Result<Self, Error> {
        let ca = read("CA certificate", &files.ca)?;
        let chain = read("certificate", &files.cert)?;
        let key = read("key", &files.key)?;
        let mut h = blake3::Hasher::new();
        for part in [&ca, &chain, &key] {
            h.update(&(part.len() as u64).to_le_bytes()).update(part);
        }
        Ok(Self { digest: h.finalize(), ca, chain, key })
    }
}

impl Loaded {
    fn build(files: &Files, raw: Raw) -> Result<Self, Error> {
        let Raw { ca, chain, key, digest } = raw;
        let mut roots = RootCertStore::empty();
        for cert in certificates("CA certificate", &files.ca, &ca)? {
            roots.add(cert).map_err(|e| pem_error("CA certificate", &files.ca, e))?;
        }
        let roots = Arc::new(roots);
        let chain = certificates("certificate", &files.cert, &chain)?;
        let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| pem_error("key", &files.key, e))?;
        let (identity, not_after) = Identity::of_certificate(&chain[0])
            .map_err(|reason| Error::Identity { path: files.cert.display().to_string(), reason })?;

        let provider = provider();
        let signer = provider.key_provider.load_private_key(key).map_err(|e| pem_error("key", &files.key, e))?;
        let certified = Arc::new(CertifiedKey::new(chain, signer));
        certified.keys_match().map_err(|_| {
            Error::Rustls(format!("the key {} is not the key of {}", files.key.display(), files.cert.display()))
        })?;
        let rustls_error = |e: rustls::Error| Error::Rustls(e.to_string());

        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| Error::Rustls(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(rustls_error)?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified.clone())));
        server.alpn_protocols = vec![b"h2".to_vec()];

        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(rustls_error)?
            .with_root_certificates(roots)
            .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
        client.alpn_protocols = vec![b"h2".to_vec()];

        Ok(Self { identity, not_after, digest, server: Arc::new(server), client: Arc::new(client) })
    }
}

impl Credentials {
    /// Reads and checks the three files.
    pub fn load(files: Files) -> Result<Self, Error> {
        let loaded = Loaded::build(&files, Raw::read(&files)?)?;
        Ok(Self { files, current: Arc::new(RwLock::new(loaded)) })
    }

    fn current(&self) -> std::sync::RwLockReadGuard<'_, Loaded> {
        self.current.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The files these credentials come from.
    pub fn files(&self) -> &Files {
        &self.files
    }

    /// Whom the certificate names.
    pub fn identity(&self) -> Identity {
        self.current().identity.clone()
    }

    /// When the current certificate expires.
    pub fn not_after(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(self.not_after_unix().max(0) as u64)
    }

    /// When the current certificate expires, seconds since the Unix epoch.
    pub fn not_after_unix(&self) -> i64 {
        self.current().not_after
    }

    /// The server configuration for the next accepted connection.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.current().server.clone()
    }

    /// The client configuration for the next connection opened.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.current().client.clone()
    }

    /// Rereads the files; `Ok(true)` when they changed and the new ones are
    /// in use, `Ok(false)` when nothing changed, an error (and the old
    /// credentials kept) when the new files are unusable. A certificate
    /// that names another identity is refused: a holder does not change who
    /// it is by a reload.
    pub fn reload(&self) -> Result<bool, Error> {
        let raw = Raw::read(&self.files)?;
        if raw.digest == self.current().digest {
            return Ok(false);
        }
        let fresh = Loaded::build(&self.files, raw)?;
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if fresh.identity != current.identity {
            return Err(Error::Identity {
                path: self.files.cert.display().to_string(),
                reason: format!("names {}, but this process is {}", fresh.identity, current.identity),
            });
        }
        *current = fresh;
        Ok(true)
    }

    /// Reloads on SIGHUP and whenever the files change (looked at every
    /// [`RELOAD_EVERY`]), until `stop` completes.
    pub async fn watch(self, stop: impl std::future::Future<Output = ()>) {
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut tick = tokio::time::interval(RELOAD_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            let asked = tokio::select! {
                () = &mut stop => return,
                _ = tick.tick() => false,
                Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
            };
            match self.reload() {
                Ok(true) => tracing::info!(identity = %self.identity(), "TLS credentials reloaded"),
                Ok(false) if asked => tracing::info!("TLS credentials unchanged"),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "TLS credentials not reloaded; the old ones stay in use"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Authority;

    #[test]
    fn credentials_load_and_reload_only_for_the_same_identity() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::new("test").unwrap();
        let files = ca.write_holder(dir.path(), &Identity::Worker("w1".into()), &[]).unwrap();
        let creds = Credentials::load(files.clone()).unwrap();
        assert_eq!(creds.identity(), Identity::Worker("w1".into()));
        assert!(!creds.reload().unwrap(), "unchanged files are no reload");

        let again = ca.write_holder(dir.path(), &Identity::Worker("w1".into()), &[]).unwrap();
        assert_eq!(again, files);
        assert!(creds.reload().unwrap(), "a new certificate for the same worker is taken");

        let other = ca.issue(&Identity::Worker("w2".into()), &[]).unwrap();
        std::fs::write(&files.cert, &other.cert_pem).unwrap();
        std::fs::write(&files.key, &other.key_pem).unwrap();
        let err = creds.reload().unwrap_err().to_string();
        assert!(err.contains("names worker w2, but this process is worker w1"), "{err}");
        assert_eq!(creds.identity(), Identity::Worker("w1".into()));

        std::fs::write(&files.key, b"-----BEGIN PRIVATE KEY-----\nhalf").unwrap();
        assert!(creds.reload().is_err(), "a half-written key is no reload");
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused_naming_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::new("test").unwrap();
        let files = ca.write_holder(dir.path(), &Identity::User("alice".into()), &[]).unwrap();
        let other = ca.issue(&Identity::User("alice".into()), &[]).unwrap();
        std::fs::write(&files.key, &other.key_pem).unwrap();
        let err = Credentials::load(files).err().unwrap().to_string();
        assert!(err.contains("-key.pem is not the key of") && !err.contains("KeyMismatch"), "{err}");
    }
}
