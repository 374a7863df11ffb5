//! Transport security for every gRPC connection Ferry makes or accepts.
//!
//! Every connection is mutual TLS (rustls, TLS 1.3 only) under one cluster
//! certificate authority. A certificate names its holder with a URI
//! subject alternative name ([`Identity`]): `ferry://scheduler/1`,
//! `ferry://worker/w3`, `ferry://user/alice`. Servers also carry a role
//! name, `scheduler.ferry` or `worker.ferry`, which is the name a client
//! checks (as Consul's `server.<dc>.consul`), so a worker's certificate can
//! never pass for a scheduler's, whatever address it answers on.
//!
//! Layout:
//! - [`identity`]: who a certificate names.
//! - [`credentials`]: the CA, certificate and key files, loaded and reloaded
//!   when they change on disk (new connections use the new ones; open ones
//!   go on).
//! - [`server`]: TLS on accepted connections, with the peer's identity in
//!   every request's extensions ([`Peer`]).
//! - [`client`]: a connector doing TLS for tonic channels.
//! - [`allow`]: the hosts a daemon may send requests to that users name
//!   (callbacks, probe targets).
//! - [`authority`]: a certificate authority (rcgen) for `ferry certs`,
//!   `ferry dev` and the tests.
//!
//! Plaintext ([`Security::Insecure`]) exists only when a user asks for it.

pub mod allow;
pub mod authority;
pub mod client;
pub mod credentials;
pub mod identity;
pub mod io;
pub mod server;

pub use authority::Authority;
pub use client::Connector;
pub use credentials::{Credentials, Files};
pub use identity::{Identity, Role};
pub use server::{incoming, Peer};

/// How a daemon or client secures its connections.
#[derive(Clone)]
pub enum Security {
    /// Mutual TLS with these credentials.
    Tls(Credentials),
    /// Plaintext, asked for explicitly (`--insecure`): no one is checked.
    Insecure,
}

impl Security {
    /// The credentials, when TLS is on.
    pub fn credentials(&self) -> Option<&Credentials> {
        match self {
            Self::Tls(c) => Some(c),
            Self::Insecure => None,
        }
    }

    /// When the certificate in use expires, seconds since the Unix epoch;
    /// 0 in plaintext.
    pub fn not_after_unix(&self) -> i64 {
        self.credentials().map_or(0, Credentials::not_after_unix)
    }

    /// Whether connections are plaintext.
    pub fn is_insecure(&self) -> bool {
        matches!(self, Self::Insecure)
    }

    /// A daemon's reload loop until `stop` completes: the credentials are
    /// reloaded on SIGHUP and when their files change
    /// ([`Credentials::watch`]); in plaintext, SIGHUP is taken and logged
    /// (so it never ends the process).
    pub async fn watch(self, stop: impl std::future::Future<Output = ()>) {
        match self {
            Self::Tls(c) => c.watch(stop).await,
            Self::Insecure => {
                let Ok(mut hangup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
                    return;
                };
                tokio::pin!(stop);
                loop {
                    tokio::select! {
                        () = &mut stop => return,
                        Some(()) = hangup.recv() => tracing::info!("SIGHUP: nothing to reload (plaintext)"),
                    }
                }
            }
        }
    }

    /// What the `ferry` CLI reads from its environment: the files named by
    /// `FERRY_TLS_CA`, `FERRY_TLS_CERT` and `FERRY_TLS_KEY`, or plaintext
    /// when `FERRY_INSECURE` is `true` (for programs using the SDK the way
    /// the CLI does).
    pub fn from_env() -> Result<Self, Error> {
        if std::env::var("FERRY_INSECURE").is_ok_and(|v| v == "true" || v == "1") {
            return Ok(Self::Insecure);
        }
        let var = |name: &'static str| std::env::var_os(name).map(std::path::PathBuf::from).ok_or(Error::Missing(name));
        let files = Files { ca: var("FERRY_TLS_CA")?, cert: var("FERRY_TLS_CERT")?, key: var("FERRY_TLS_KEY")? };
        Ok(Self::Tls(Credentials::load(files)?))
    }
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tls(c) => write!(f, "Tls({})", c.identity()),
            Self::Insecure => f.write_str("Insecure"),
        }
    }
}

/// What can go wrong loading or making credentials.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("{what} {path}: {source}")]
    Read { what: &'static str, path: String, source: std::io::Error },
    /// A file held no usable PEM item of the kind needed.
    #[error("{what} {path}: {reason}")]
    Pem { what: &'static str, path: String, reason: String },
    /// A certificate names no Ferry identity, or a malformed one.
    #[error("certificate {path}: {reason}")]
    Identity { path: String, reason: String },
    /// rustls refused the material (a key not matching, a bad CA).
    #[error("{0}")]
    Rustls(String),
    /// A setting is missing (TLS on, but a file not named).
    #[error("{0} is not set: name the cluster's CA, a certificate and its key (or ask for plaintext explicitly)")]
    Missing(&'static str),
    /// Making a certificate failed.
    #[error("making a certificate: {0}")]
    Issue(String),
}

/// A daemon's `[tls]` settings: the three PEM files.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// The cluster CA's certificate.
    pub ca: Option<std::path::PathBuf>,
    /// This daemon's certificate, naming it (`ferry certs`).
    pub cert: Option<std::path::PathBuf>,
    /// The certificate's private key.
    pub key: Option<std::path::PathBuf>,
}

impl TlsConfig {
    /// The security these settings and `insecure` ask for, loaded; on a
    /// problem, the field at fault and why.
    pub fn security(&self, insecure: bool) -> Result<Security, (&'static str, String)> {
        let named = [&self.ca, &self.cert, &self.key].iter().any(|f| f.is_some());
        if insecure {
            if named {
                return Err((
                    "insecure",
                    "plaintext was asked for, but tls-ca, tls-cert or tls-key names a file: choose one".into(),
                ));
            }
            return Ok(Security::Insecure);
        }
        let need = |field: &'static str, value: &Option<std::path::PathBuf>| {
            value.clone().ok_or((
                field,
                "not set: give --tls-ca, --tls-cert and --tls-key (made by `ferry certs`; client commands also read \
                 FERRY_TLS_CA, FERRY_TLS_CERT and FERRY_TLS_KEY, a daemon its TOML's [tls]), or --insecure for plaintext"
                    .to_string(),
            ))
        };
        let files = Files {
            ca: need("tls-ca", &self.ca)?,
            cert: need("tls-cert", &self.cert)?,
            key: need("tls-key", &self.key)?,
        };
        Credentials::load(files).map(Security::Tls).map_err(|e| ("tls", e.to_string()))
    }

    /// Like [`TlsConfig::security`], and the certificate must name `me`.
    pub fn security_of(&self, insecure: bool, me: &Identity) -> Result<Security, (&'static str, String)> {
        let security = self.security(insecure)?;
        if let Some(c) = security.credentials() {
            if c.identity() != *me {
                return Err(("tls-cert", format!("names {}, but this is {me}", c.identity())));
            }
        }
        Ok(security)
    }
}

impl From<Files> for TlsConfig {
    fn from(f: Files) -> Self {
        Self { ca: Some(f.ca), cert: Some(f.cert), key: Some(f.key) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_settings_name_the_field_at_fault() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::new("t").unwrap();
        let files = ca.write_holder(dir.path(), &Identity::Scheduler(1), &[]).unwrap();
        let full = TlsConfig::from(files.clone());
        let field = |c: &TlsConfig, insecure: bool| c.security_of(insecure, &Identity::Scheduler(1)).err().map(|e| e.0);
        assert_eq!(field(&full, true), Some("insecure"), "plaintext and certificates both named");
        assert_eq!(field(&TlsConfig::default(), false), Some("tls-ca"));
        assert_eq!(field(&TlsConfig { key: None, ..full.clone() }, false), Some("tls-key"));
        assert_eq!(field(&TlsConfig { cert: Some(dir.path().join("none.pem")), ..full.clone() }, false), Some("tls"));
        let other = full.security_of(false, &Identity::Scheduler(2)).err().unwrap();
        assert_eq!(other.0, "tls-cert");
        assert!(other.1.contains("names scheduler 1, but this is scheduler 2"), "{}", other.1);
        assert!(full.security_of(false, &Identity::Scheduler(1)).is_ok());
        assert!(TlsConfig::default().security(true).unwrap().is_insecure());
    }

    #[test]
    fn admit_lets_in_only_the_role_it_names_and_everyone_in_plaintext() {
        use tonic::service::Interceptor;
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::new("t").unwrap();
        let tls = Security::Tls(
            Credentials::load(ca.write_holder(dir.path(), &Identity::Worker("w".into()), &[]).unwrap()).unwrap(),
        );
        let from = |who: Option<Identity>| {
            let mut r = tonic::Request::new(());
            if let Some(identity) = who {
                r.extensions_mut().insert(Peer { remote: None, identity: Some(identity) });
            }
            r
        };
        let mut admit = server::Admit::new(Role::Worker, &tls);
        assert!(admit.call(from(Some(Identity::Worker("w2".into())))).is_ok());
        let denied = admit.call(from(Some(Identity::User("u".into())))).unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(denied.message().contains("only a worker may call this; this is user u"), "{}", denied.message());
        assert_eq!(admit.call(from(None)).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert!(server::Admit::new(Role::Worker, &Security::Insecure).call(from(None)).is_ok());
    }
}
