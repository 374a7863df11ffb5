//! The scheduler's error type and its one conversion to `tonic::Status`.

use ferry_proto::LEADER_ADDR_HEADER;
use tonic::metadata::MetadataValue;

/// What a scheduler operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The data directory could not be opened.
    #[error(transparent)]
    Storage(#[from] ferry_storage::Error),
    /// The data directory belongs to another cluster.
    #[error("{0}")]
    WrongCluster(String),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    /// openraft refused to start or to initialize.
    #[error("raft {op} failed: {reason}")]
    Raft { op: &'static str, reason: String },
    /// A request field is invalid.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request cannot be done in the current state of the cluster.
    #[error("{0}")]
    FailedPrecondition(String),
    /// What the request names does not exist (the message names the field).
    #[error("{0}")]
    NotFound(String),
    /// What the request would create is someone else's (the message names
    /// the field and the holder).
    #[error("{0}")]
    AlreadyExists(String),
    /// A revision or position outside what exists (the message names the field).
    #[error("{0}")]
    OutOfRange(String),
    /// Something that should not fail did (an encoding, a local file).
    #[error("{0}")]
    Internal(String),
    /// Received data failed its check (a snapshot cut short or damaged).
    #[error("{0}")]
    DataLoss(String),
    /// The state machine answered a command with a result of another kind:
    /// a bug, reported instead of guessed around.
    #[error("unexpected result for {op}: {result}")]
    Unexpected { op: &'static str, result: String },
    /// This node is not the leader (and the call was not forwarded: no
    /// leader is known, or it was forwarded here already).
    #[error("not leader; {}", match (.leader_id, .leader_addr) {
        (Some(id), Some(addr)) => format!("leader is node {id} at {addr}"),
        _ => "no leader known yet, retry shortly".to_string(),
    })]
    NotLeader { leader_id: Option<u64>, leader_addr: Option<String> },
    /// A peer could not be reached.
    #[error("peer {addr} unreachable: {reason}")]
    Unreachable { addr: String, reason: String },
    /// Waiting for the local state machine took too long.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The node is shutting down or raft stopped.
    #[error("scheduler is stopping: {0}")]
    Stopped(String),
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        match e {
            Error::InvalidArgument(_) | Error::Config(_) => tonic::Status::invalid_argument(msg),
            Error::FailedPrecondition(_) => tonic::Status::failed_precondition(msg),
            Error::NotFound(_) => tonic::Status::not_found(msg),
            Error::AlreadyExists(_) => tonic::Status::already_exists(msg),
            Error::OutOfRange(_) => tonic::Status::out_of_range(msg),
            Error::Unexpected { .. } | Error::Internal(_) => tonic::Status::internal(msg),
            Error::DataLoss(_) => tonic::Status::data_loss(msg),
            Error::NotLeader { leader_addr, .. } => {
                let mut status = tonic::Status::unavailable(msg);
                if let Some(value) = leader_addr.and_then(|a| MetadataValue::try_from(a).ok()) {
                    status.metadata_mut().insert(LEADER_ADDR_HEADER, value);
                }
                status
            }
            Error::Unreachable { .. } | Error::Stopped(_) => tonic::Status::unavailable(msg),
            Error::Timeout(_) => tonic::Status::deadline_exceeded(msg),
            Error::Storage(_) | Error::Bind { .. } | Error::Raft { .. } | Error::WrongCluster(_) => {
                tonic::Status::internal(msg)
            }
        }
    }
}

impl Error {
    /// The error for a state machine result a call did not expect.
    pub fn unexpected(op: &'static str, result: &ferry_storage::CommandResult) -> Self {
        Error::Unexpected { op, result: format!("{result:?}") }
    }
}
