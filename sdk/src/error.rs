//! Errors returned by the SDK.

/// What a call can fail with.
///
/// Only [`Error::Unavailable`] is worth retrying: the client already
/// retried until its budget ([`crate::ClientOptions::total_timeout`]) ran
/// out. [`Error::Rejected`] is the cluster's answer and stays the same.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No endpoints, or one that is not `host:port`.
    #[error("endpoints: {0}")]
    InvalidEndpoint(String),
    /// The options say neither how to secure connections nor that they
    /// may be plaintext.
    #[error("no TLS credentials: give the cluster's CA, a certificate and its key, or ask for plaintext explicitly")]
    NoSecurity,
    /// The TLS credentials named could not be used (a file missing, a key
    /// not matching its certificate).
    #[error("{0}")]
    Credentials(String),
    /// The server refused the request (bad argument, failed precondition, …).
    #[error("{}", .0.message())]
    Rejected(tonic::Status),
    /// Every endpoint failed until the deadline; the last error is kept.
    /// A write that fails so applied once or not at all (its retries shared
    /// one request id); read before writing again if that matters.
    #[error("no scheduler could serve the call before the deadline: {}", .last.message())]
    Unavailable {
        /// The last failure seen.
        last: tonic::Status,
    },
}

impl Error {
    /// The gRPC code behind the error.
    pub fn code(&self) -> tonic::Code {
        match self {
            Error::InvalidEndpoint(_) | Error::NoSecurity | Error::Credentials(_) => tonic::Code::InvalidArgument,
            Error::Rejected(s) => s.code(),
            Error::Unavailable { last } => last.code(),
        }
    }

    /// True when the server does not know the call (gRPC `Unimplemented`):
    /// it runs an older release.
    pub fn is_unimplemented(&self) -> bool {
        self.code() == tonic::Code::Unimplemented
    }

    /// True when the caller's input was at fault (gRPC `InvalidArgument`).
    pub fn is_invalid_argument(&self) -> bool {
        self.code() == tonic::Code::InvalidArgument
    }
}
