//! Certificates for the clusters the benches start: one throwaway CA per
//! run (as `ferry dev` makes), a certificate per process and one for the
//! bench's own clients.

use std::path::{Path, PathBuf};

use ferry_sdk::tls::{Authority, Credentials, Files, Identity};
use ferry_sdk::Security;

/// A run's CA and where its files go.
pub struct BenchCa {
    dir: PathBuf,
    ca: Authority,
}

impl BenchCa {
    /// A new CA with its files under `dir`.
    pub fn new(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let ca = Authority::new("bench")?;
        ca.write(dir)?;
        Ok(Self { dir: dir.to_path_buf(), ca })
    }

    /// Issues `identity` a certificate (written under the CA's directory).
    pub fn files(&self, identity: &Identity) -> anyhow::Result<Files> {
        Ok(self.ca.write_holder(&self.dir, identity, &[])?)
    }

    /// The flags that give a `ferry` daemon `identity`'s certificate.
    pub fn flags(&self, identity: &Identity) -> anyhow::Result<Vec<std::ffi::OsString>> {
        Ok(self.files(identity)?.flags())
    }

    /// Credentials of the bench's own clients.
    pub fn client(&self) -> anyhow::Result<Security> {
        Ok(Security::Tls(Credentials::load(self.files(&Identity::User("bench".into()))?)?))
    }
}
