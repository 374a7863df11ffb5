//! The node's own state file, `<data>/state`: the few facts whose loss or
//! rollback would break Raft's promises, kept outside sled.
//!
//! sled 0.34 reads a checksum failure in an older segment as a torn tail
//! and silently skips the rest of it, so anything kept only in sled can roll
//! back without an error. A node that forgets its vote can vote twice in
//! one term; one that forgets how far its log was durable serves a shorter
//! log as if nothing happened. So the vote, the last purged log id, the
//! current snapshot, the node and cluster ids and the id of the last log
//! entry known durable in sled ("durable through") live here, and
//! [`crate::start_check`] compares sled and the journals against them at
//! every start.
//!
//! Format (version 1): two slots of [`SLOT`] bytes, written in turn. A slot
//! is `FERRYST1`, the generation (u64 LE), the payload length (u32 LE), the
//! first 16 bytes of blake3 over generation, length and payload, then the
//! payload ([`crate::codec`] of [`NodeState`]). A write goes to the slot not
//! holding the newest generation and is `fdatasync`ed before it returns, so
//! a write cut off by a crash leaves the previous state in the other slot.
//! At open the valid slot with the higher generation wins; a file with no
//! valid slot is refused.

use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use openraft::{BasicNode, LogId, SnapshotMeta, Vote};
use serde::{Deserialize, Serialize};

use crate::codec;
use crate::error::Error;
use crate::NodeId;

/// The file's name in the data directory.
pub(crate) const FILE_NAME: &str = "state";
const MAGIC: &[u8; 8] = b"FERRYST1";
/// Bytes of one slot: the payload holds a membership config, so room for
/// a large cluster's addresses.
const SLOT: usize = 64 * 1024;
/// Magic, generation, length, checksum.
const SLOT_HEAD: usize = 8 + 8 + 4 + 16;

/// What the state file holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct NodeState {
    /// The node id the directory was first opened as.
    pub node_id: Option<NodeId>,
    /// The cluster the directory's log belongs to, once known.
    pub cluster_id: Option<String>,
    /// The vote as last saved.
    pub vote: Option<Vote<NodeId>>,
    /// The log is purged through this id: its entries are in the snapshot.
    pub last_purged: Option<LogId<NodeId>>,
    /// Every entry up to this one was in sled when sled was last synced
    /// whole (later ones are in the journals).
    pub durable_through: Option<LogId<NodeId>>,
    /// The current snapshot: its meta and its file in `snapshots/`.
    pub snapshot: Option<(SnapshotMeta<NodeId, BasicNode>, String)>,
}

/// The open state file and what it holds now.
#[derive(Debug)]
pub(crate) struct StateFile {
    path: PathBuf,
    file: File,
    generation: u64,
    state: NodeState,
}

fn checksum(generation: u64, payload: &[u8]) -> [u8; 16] {
    codec::checksum(&[&generation.to_le_bytes(), &(payload.len() as u32).to_le_bytes(), payload])
}

/// The generation and payload of a valid slot.
fn read_slot(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let head = bytes.get(..SLOT_HEAD)?;
    if &head[..8] != MAGIC {
        return None;
    }
    let generation = u64::from_le_bytes(head[8..16].try_into().ok()?);
    let len = u32::from_le_bytes(head[16..20].try_into().ok()?) as usize;
    let payload = bytes.get(SLOT_HEAD..SLOT_HEAD + len)?;
    (head[20..36] == checksum(generation, payload)).then_some((generation, payload))
}

impl StateFile {
    /// Reads the state file in `dir`, or `None` if there is none. With
    /// `new_dir` (nothing else in the directory was written yet) a file of
    /// zeros, cut off while it was created, is removed and counts as none.
    pub(crate) fn open(dir: &Path, new_dir: bool) -> Result<Option<Self>, Error> {
        let path = dir.join(FILE_NAME);
        let file = match File::options().read(true).write(true).open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(Error::Open { path, source }),
        };
        let mut bytes = vec![0u8; 2 * SLOT];
        let mut read = 0;
        while read < bytes.len() {
            match file.read_at(&mut bytes[read..], read as u64) {
                Ok(0) => break,
                Ok(n) => read += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(source) => return Err(Error::Open { path, source }),
            }
        }
        if new_dir && bytes.iter().all(|b| *b == 0) {
            drop(file);
            std::fs::remove_file(&path).map_err(|source| Error::Open { path, source })?;
            return Ok(None);
        }
        let newest = bytes.chunks(SLOT).filter_map(read_slot).max_by_key(|(generation, _)| *generation);
        let Some((generation, payload)) = newest else {
            return Err(Error::Corrupt {
                path: dir.into(),
                reason: format!("its state file {} has no valid slot (both checksums fail)", path.display()),
            });
        };
        let state = codec::decode("node state", payload)?;
        Ok(Some(Self { path, file, generation, state }))
    }

    /// Creates the state file in `dir` holding `state`, durably (the file
    /// and its name). Fails if one exists.
    pub(crate) fn create(dir: &Path, state: NodeState) -> Result<Self, Error> {
        let path = dir.join(FILE_NAME);
        let open_err = |source| Error::Open { path: path.clone(), source };
        let file = File::options().read(true).write(true).create_new(true).open(&path).map_err(open_err)?;
        file.set_len(2 * SLOT as u64).map_err(open_err)?;
        let mut this = Self { path: path.clone(), file, generation: 0, state: NodeState::default() };
        this.write(state)?;
        this.file.sync_all().map_err(open_err)?;
        crate::db::fsync_dir(dir).map_err(open_err)?;
        Ok(this)
    }

    /// What the file holds.
    pub(crate) fn state(&self) -> &NodeState {
        &self.state
    }

    /// Writes `state` into the older slot and syncs it. On an error the
    /// file still holds what it held before (in the other slot); the caller
    /// treats it as a failed sync (final).
    pub(crate) fn write(&mut self, state: NodeState) -> Result<(), Error> {
        let payload = codec::encode("node state", &state)?;
        if SLOT_HEAD + payload.len() > SLOT {
            return Err(Error::Corrupt {
                path: self.path.clone(),
                reason: format!("the node state is {} bytes, over the {SLOT}-byte slot", payload.len()),
            });
        }
        let generation = self.generation + 1;
        let mut slot = Vec::with_capacity(SLOT_HEAD + payload.len());
        slot.extend_from_slice(MAGIC);
        slot.extend_from_slice(&generation.to_le_bytes());
        slot.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        slot.extend_from_slice(&checksum(generation, &payload));
        slot.extend_from_slice(&payload);
        let at = (generation % 2) * SLOT as u64;
        let io_err = |source| Error::Open { path: self.path.clone(), source };
        self.file.write_all_at(&slot, at).map_err(io_err)?;
        self.file.sync_data().map_err(io_err)?;
        self.generation = generation;
        self.state = state;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use openraft::CommittedLeaderId;

    use super::*;

    fn state(term: u64) -> NodeState {
        NodeState {
            node_id: Some(3),
            vote: Some(Vote::new_committed(term, 3)),
            durable_through: Some(LogId::new(CommittedLeaderId::new(term, 3), 10)),
            ..NodeState::default()
        }
    }

    #[test]
    fn the_newest_write_wins_and_a_torn_one_falls_back_to_the_one_before() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(StateFile::open(tmp.path(), false).unwrap().is_none());
        let mut file = StateFile::create(tmp.path(), state(1)).unwrap();
        file.write(state(2)).unwrap();
        file.write(state(3)).unwrap();
        drop(file);
        let file = StateFile::open(tmp.path(), false).unwrap().unwrap();
        assert_eq!(file.state(), &state(3));
        drop(file);
        // Generation 3 went to slot 1: tear it.
        let raw = File::options().write(true).open(tmp.path().join(FILE_NAME)).unwrap();
        raw.write_all_at(&[0xff; 8], (SLOT + SLOT_HEAD + 2) as u64).unwrap();
        let file = StateFile::open(tmp.path(), false).unwrap().unwrap();
        assert_eq!(file.state(), &state(2));
    }

    #[test]
    fn a_file_with_no_valid_slot_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let mut file = StateFile::create(tmp.path(), state(1)).unwrap();
        file.write(state(2)).unwrap();
        drop(file);
        let raw = File::options().write(true).open(tmp.path().join(FILE_NAME)).unwrap();
        raw.write_all_at(b"x", (SLOT_HEAD + 1) as u64).unwrap();
        raw.write_all_at(b"x", (SLOT + SLOT_HEAD + 1) as u64).unwrap();
        let err = StateFile::open(tmp.path(), false).unwrap_err();
        assert!(err.to_string().contains("no valid slot"), "{err}");
        assert!(StateFile::create(tmp.path(), state(1)).is_err(), "an existing state file is never replaced");
    }

    #[test]
    fn a_file_cut_off_while_it_was_created_counts_as_none_in_a_new_directory_only() {
        let tmp = tempfile::tempdir().unwrap();
        File::create(tmp.path().join(FILE_NAME)).unwrap().set_len(2 * SLOT as u64).unwrap();
        assert!(StateFile::open(tmp.path(), false).is_err());
        assert!(StateFile::open(tmp.path(), true).unwrap().is_none());
        let file = StateFile::create(tmp.path(), state(1)).unwrap();
        assert_eq!(file.state(), &state(1));
    }
}
