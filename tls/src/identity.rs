//! Who a certificate names: a scheduler by node id, a worker by name, a
//! user by name, written as one URI subject alternative name.

use std::fmt;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The URI scheme of identities.
const SCHEME: &str = "ferry://";

/// The name every scheduler certificate carries and every client of a
/// scheduler checks.
pub const SCHEDULER_NAME: &str = "scheduler.ferry";
/// The name every worker certificate carries and every worker pulling from
/// a peer checks.
pub const WORKER_NAME: &str = "worker.ferry";

/// The holder of a certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Identity {
    /// A scheduler node (a member of the Raft group).
    Scheduler(u64),
    /// A worker daemon, by its worker name.
    Worker(String),
    /// A person or program using the CLI, the SDK or grpcurl.
    User(String),
}

/// The kind of holder, without the name: what a server proves it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Schedulers serve clients, workers and each other.
    Scheduler,
    /// Workers serve chunks to each other.
    Worker,
}

impl Role {
    /// The name servers of this role carry and clients check.
    pub fn server_name(self) -> &'static str {
        match self {
            Self::Scheduler => SCHEDULER_NAME,
            Self::Worker => WORKER_NAME,
        }
    }
}

/// Whether `name` can be a user's or a worker's name in a certificate: 1 to
/// 128 characters of letters, digits, `.`, `-`, `_` and `@`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '@'))
}

impl Identity {
    /// The URI a certificate carries for this identity.
    pub fn uri(&self) -> String {
        match self {
            Self::Scheduler(id) => format!("{SCHEME}scheduler/{id}"),
            Self::Worker(name) => format!("{SCHEME}worker/{name}"),
            Self::User(name) => format!("{SCHEME}user/{name}"),
        }
    }

    /// Reads an identity URI; `None` for anything else.
    pub fn from_uri(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix(SCHEME)?;
        let (kind, name) = rest.split_once('/')?;
        match kind {
            "scheduler" => name.parse().ok().filter(|id| *id > 0).map(Self::Scheduler),
            "worker" if valid_name(name) => Some(Self::Worker(name.into())),
            "user" if valid_name(name) => Some(Self::User(name.into())),
            _ => None,
        }
    }

    /// The server role this identity may take, if any.
    pub fn role(&self) -> Option<Role> {
        match self {
            Self::Scheduler(_) => Some(Role::Scheduler),
            Self::Worker(_) => Some(Role::Worker),
            Self::User(_) => None,
        }
    }

    /// The one identity a DER certificate names, and when it expires
    /// (seconds since the Unix epoch).
    pub fn of_certificate(der: &[u8]) -> Result<(Self, i64), String> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
        let not_after = cert.validity().not_after.timestamp();
        let names = cert.subject_alternative_name().map_err(|e| format!("bad subject alternative names: {e}"))?;
        let mut found = names.into_iter().flat_map(|ext| ext.value.general_names.iter()).filter_map(|n| match n {
            GeneralName::URI(uri) if uri.starts_with(SCHEME) => Some(*uri),
            _ => None,
        });
        let uri = found.next().ok_or_else(|| "names no Ferry identity (a ferry:// URI)".to_string())?;
        if found.next().is_some() {
            return Err("names more than one Ferry identity".into());
        }
        let identity = Self::from_uri(uri).ok_or_else(|| format!("'{uri}' is not a Ferry identity"))?;
        Ok((identity, not_after))
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Scheduler(id) => write!(f, "scheduler {id}"),
            Self::Worker(name) => write!(f, "worker {name}"),
            Self::User(name) => write!(f, "user {name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_through_their_uri_and_bad_ones_are_refused() {
        for id in [Identity::Scheduler(3), Identity::Worker("w-1.a".into()), Identity::User("alice@ops".into())] {
            assert_eq!(Identity::from_uri(&id.uri()), Some(id));
        }
        for bad in [
            "ferry://scheduler/0",
            "ferry://scheduler/x",
            "ferry://worker/",
            "ferry://worker/a b",
            "ferry://user/a/b",
            "ferry://admin/x",
            "spiffe://user/x",
        ] {
            assert_eq!(Identity::from_uri(bad), None, "{bad}");
        }
    }
}
