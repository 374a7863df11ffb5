//! The versioned binary encoding for everything Ferry persists or sends
//! between schedulers: log entries, Raft RPC payloads, state machine records.
//!
//! Every encoded value starts with one byte, the format version, followed by
//! postcard. A newer node reads older versions; a node meeting a newer version,
//! or a command kind it does not know (an enum variant added later, always
//! appended at the end), fails with [`CodecError`] instead of panicking, so an
//! older node in a rolling upgrade stops with a clear message.
//!
//! Versions: 1 stored registry instances as protobuf; 2 stores them as JSON
//! (see [`crate::registry`]). Values that hold commands or keys are read
//! with [`decode_upgraded`], which converts what an older version wrote
//! (the conversions are in [`crate::upgrade`]).

use serde::{de::DeserializeOwned, Serialize};

/// The first `N` bytes of blake3 over `parts`, one after another: the
/// checksum of the journal's records, the state file's slots and snapshot
/// frames (each format fixes its `N` and parts).
pub(crate) fn checksum<const N: usize>(parts: &[&[u8]]) -> [u8; N] {
    let mut hasher = blake3::Hasher::new();
    for part in parts {
        hasher.update(part);
    }
    let mut out = [0u8; N];
    out.copy_from_slice(&hasher.finalize().as_bytes()[..N]);
    out
}

/// The format version this binary writes.
pub const FORMAT_VERSION: u8 = 2;

/// Why a value could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The bytes were written by a newer format than this node knows.
    #[error("{what} uses encoding format v{found}, newer than this node's v{FORMAT_VERSION}; upgrade this node")]
    NewerFormat { what: &'static str, found: u8 },
    /// The bytes are empty.
    #[error("{what} is empty: no format version byte")]
    Empty { what: &'static str },
    /// postcard rejected the bytes: a truncated value or a kind this node does
    /// not know.
    #[error("cannot decode {what} (format v{version}): {source}; it may hold a command kind unknown to ferry {}, which then needs an upgrade", env!("CARGO_PKG_VERSION"))]
    Decode { what: &'static str, version: u8, source: postcard::Error },
    /// The value decoded but bytes were left over: a different type was stored.
    #[error("cannot decode {what}: {bytes} unexpected trailing bytes")]
    Trailing { what: &'static str, bytes: usize },
    /// postcard could not encode the value.
    #[error("cannot encode {what}: {source}")]
    Encode { what: &'static str, source: postcard::Error },
}

/// Encodes `value` as `[FORMAT_VERSION] ++ postcard(value)`.
pub fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::new();
    encode_into(what, value, &mut out)?;
    Ok(out)
}

/// [`encode`], appended to `out`.
pub fn encode_into<T: Serialize>(what: &'static str, value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    out.push(FORMAT_VERSION);
    postcard::to_io(value, out).map_err(|source| CodecError::Encode { what, source })?;
    Ok(())
}

/// How many bytes [`encode`] would write for `value`, without writing them.
pub fn encoded_len<T: Serialize>(what: &'static str, value: &T) -> Result<usize, CodecError> {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(1);
    postcard::to_io(value, &mut count).map_err(|source| CodecError::Encode { what, source })?;
    Ok(count.0)
}

/// Decodes bytes written by [`encode`] (this or any older format version),
/// for values whose meaning did not change between versions.
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, CodecError> {
    decode_versioned(what, bytes).map(|(value, _)| value)
}

/// A value whose content an older format version wrote differently, and
/// converts itself to today's form.
pub trait Upgrade {
    /// Converts a value decoded from format version `from` (older than
    /// [`FORMAT_VERSION`]). Deterministic: every node converts alike.
    fn upgrade(&mut self, from: u8);
}

/// Decodes bytes written by [`encode`] with any format version, converting
/// what an older version wrote to today's form.
pub fn decode_upgraded<T: DeserializeOwned + Upgrade>(what: &'static str, bytes: &[u8]) -> Result<T, CodecError> {
    let (mut value, version): (T, u8) = decode_versioned(what, bytes)?;
    if version < FORMAT_VERSION {
        value.upgrade(version);
    }
    Ok(value)
}

fn decode_versioned<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<(T, u8), CodecError> {
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty { what })?;
    if version > FORMAT_VERSION {
        return Err(CodecError::NewerFormat { what, found: version });
    }
    let (value, rest) =
        postcard::take_from_bytes(body).map_err(|source| CodecError::Decode { what, version, source })?;
    if !rest.is_empty() {
        return Err(CodecError::Trailing { what, bytes: rest.len() });
    }
    Ok((value, version))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    enum Old {
        A(u32),
        B { s: String },
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    enum New {
        A(u32),
        B { s: String },
        C(bool),
    }

    #[test]
    fn newer_node_reads_older_values() {
        let bytes = encode("entry", &Old::B { s: "x".into() }).unwrap();
        let new: New = decode("entry", &bytes).unwrap();
        assert_eq!(new, New::B { s: "x".into() });
    }

    #[test]
    fn older_node_rejects_unknown_kind_with_clear_error() {
        let bytes = encode("log entry", &New::C(true)).unwrap();
        let err = decode::<Old>("log entry", &bytes).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("cannot decode log entry"), "{msg}");
        assert!(msg.contains("unknown"), "{msg}");
    }

    #[test]
    fn byte_strings_encode_like_u8_sequences() {
        #[derive(Serialize)]
        struct Plain(Vec<u8>);
        #[derive(Serialize)]
        struct Bytes(#[serde(with = "serde_bytes")] Vec<u8>);
        let v: Vec<u8> = (0..=255).collect();
        assert_eq!(encode("x", &Plain(v.clone())).unwrap(), encode("x", &Bytes(v)).unwrap());
    }

    #[test]
    fn newer_format_version_is_rejected() {
        let mut bytes = encode("log entry", &Old::A(1)).unwrap();
        bytes[0] = FORMAT_VERSION + 1;
        let err = decode::<Old>("log entry", &bytes).unwrap_err();
        assert!(matches!(err, CodecError::NewerFormat { found, .. } if found == FORMAT_VERSION + 1));
        assert!(decode::<Old>("log entry", &[]).is_err());
    }
}
