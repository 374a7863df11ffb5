//! The log's journal: what makes an append durable without a sled flush.
//!
//! A sled 0.34 flush hands its buffers between sled's I/O threads three
//! times and then needs an `fdatasync` on top (see [`DataDir::sync`]), which
//! put two of those in a row on every write of a three-node group (the
//! leader's append, then a follower's). So appended entries go into sled
//! unflushed and, as records, into this file, which is written at its end
//! with one `pwrite` and made durable with one `fdatasync`. The file is
//! allocated ahead, so that sync does not also change its size, and written
//! ahead with zeros a mebibyte at a time: a write into allocated but never
//! written blocks (unwritten extents, on ext4 and XFS) changes the file's
//! block map, so its `fdatasync` must also commit the file system's journal,
//! and waits there for whatever else that commit carries (another file's
//! writeback, a snapshot being written). Once a block has been written, a
//! record's sync is the data and a cache flush only.
//!
//! sled stays the log's store, and the only one readers see. The journal
//! holds the entries appended since the last *checkpoint*, a full
//! [`DataDir::sync`] after which everything in it is in sled as well; it is
//! then started over. At open, its records are put back into sled, which
//! restores whatever a crash took from sled's unflushed buffers.
//!
//! Layout (format 2): a 64-byte header (`FERRYJ02`, an epoch, a checksum),
//! then records of a 28-byte head (payload length, a checksum of the epoch,
//! the synced offset and the payload, the epoch, the synced offset) and the
//! payload. The synced offset is how far the journal was durable when the
//! record was written: every byte before it had been through an
//! `fdatasync`. Starting over bumps the epoch in the header, so older
//! records left in the file no longer count.
//!
//! Reading stops at the first record that is short, fails its checksum, or
//! has another epoch: the end, or a write torn by a crash. A torn write can
//! only be one that was not synced yet, so the reader looks past it: a valid
//! record of the current epoch further on whose synced offset is beyond the
//! bad one proves the bad one had been synced, and so was damaged on disk
//! afterwards. Then the journal is refused ([`JournalDamaged`]) instead of
//! read as if its end were there. Format 1 (`FERRYJ01`, a 20-byte head
//! without the synced offset) is still read, without that check; the first
//! start over writes format 2.
//!
//! [`DataDir::sync`]: crate::db::DataDir

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MAGIC: &[u8; 8] = b"FERRYJ02";
/// Format 1's magic: records without the synced offset.
const MAGIC_1: &[u8; 8] = b"FERRYJ01";
/// Bytes before the first record.
const HEADER: u64 = 64;
/// Length (4), checksum (8), epoch (8), synced offset (8).
const RECORD_HEAD: usize = 28;
/// Format 1's record head: length, checksum, epoch.
const RECORD_HEAD_1: usize = 20;
/// Zeros written past the last record whenever the records reach the end of
/// the zeros, so the file system converts its blocks a mebibyte at a time
/// (one journal commit per mebibyte of records instead of per 4 KiB block).
const ZERO_AHEAD: u64 = 1024 * 1024;

/// An open journal file.
#[derive(Debug)]
pub(crate) struct Journal {
    path: PathBuf,
    file: Arc<File>,
    epoch: u64,
    /// Where the next record goes.
    end: u64,
    /// Past this offset the journal asks for a checkpoint.
    capacity: u64,
    /// Every byte before this offset has been written (records or zeros).
    written: u64,
    /// Opened with records in it: appends wait for a [`Journal::reset`],
    /// since records after a torn one may still carry the current epoch.
    stale: bool,
    /// How far the file is durable in the current epoch.
    synced: Arc<std::sync::Mutex<Synced>>,
}

/// The offset through which a journal's current epoch is durable.
#[derive(Debug, Clone, Copy)]
struct Synced {
    epoch: u64,
    offset: u64,
}

/// A journal's file as of one append, to `fdatasync` off the journal's lock
/// and on a blocking thread: [`SyncPoint::sync`] makes every record
/// appended before it durable, and records that for later records.
#[derive(Debug, Clone)]
pub(crate) struct SyncPoint {
    file: Arc<File>,
    epoch: u64,
    offset: u64,
    synced: Arc<std::sync::Mutex<Synced>>,
}

impl SyncPoint {
    /// `fdatasync`s the file.
    pub(crate) fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()?;
        let mut synced = self.synced.lock().unwrap_or_else(|e| e.into_inner());
        if synced.epoch == self.epoch {
            synced.offset = synced.offset.max(self.offset);
        }
        Ok(())
    }
}

/// A journal whose records were damaged after they were made durable.
#[derive(Debug, thiserror::Error)]
#[error("journal {path}: the record at byte {bad} is damaged, but a record at byte {later} was written after it had been synced")]
pub(crate) struct JournalDamaged {
    pub path: PathBuf,
    pub bad: u64,
    pub later: u64,
}

fn checksum(epoch: u64, payload: &[u8]) -> [u8; 8] {
    crate::codec::checksum(&[&epoch.to_le_bytes(), payload])
}

fn record_checksum(epoch: u64, synced: u64, payload: &[u8]) -> [u8; 8] {
    crate::codec::checksum(&[&epoch.to_le_bytes(), &synced.to_le_bytes(), payload])
}

/// A record of format 2 at `at`, valid in `epoch`: its payload's length
/// and the synced offset it carries.
fn record_at(bytes: &[u8], at: usize, epoch: u64) -> Option<(usize, u64)> {
    let head = bytes.get(at..at + RECORD_HEAD)?;
    if head[12..20] != epoch.to_le_bytes() {
        return None;
    }
    let len = u32::from_le_bytes(head[..4].try_into().ok()?) as usize;
    let synced = u64::from_le_bytes(head[20..28].try_into().ok()?);
    let payload = bytes.get(at + RECORD_HEAD..at + RECORD_HEAD + len)?;
    (len > 0 && head[4..12] == record_checksum(epoch, synced, payload)).then_some((len, synced))
}

/// A record of format 1 at `at`, valid in `epoch`: its payload's length.
fn record_1_at(bytes: &[u8], at: usize, epoch: u64) -> Option<usize> {
    let head = bytes.get(at..at + RECORD_HEAD_1)?;
    let len = u32::from_le_bytes(head[..4].try_into().ok()?) as usize;
    let payload = bytes.get(at + RECORD_HEAD_1..at + RECORD_HEAD_1 + len)?;
    (len > 0 && head[12..20] == epoch.to_le_bytes() && head[4..12] == checksum(epoch, payload)).then_some(len)
}
fn header(epoch: u64) -> [u8; HEADER as usize] {
    let mut h = [0u8; HEADER as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&epoch.to_le_bytes());
    h[16..24].copy_from_slice(&checksum(epoch, MAGIC));
    h
}

fn corrupt(path: &Path, what: &str) -> std::io::Error {
    std::io::Error::new(ErrorKind::InvalidData, format!("journal {}: {what}", path.display()))
}

/// Reserves `len` bytes of disk for `file` without writing them, where the
/// file system can; elsewhere the file simply grows as it is written.
fn allocate(file: &File, len: u64) {
    // SAFETY: a valid open descriptor; fallocate only reads its arguments.
    let _ = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
}

impl Journal {
    /// Opens the journal at `path`, creating it (empty) if it does not exist,
    /// and returns it with the payloads of its current records, oldest first.
    /// An existing journal takes appends only after a [`Journal::reset`]
    /// (once what the records hold is durable elsewhere).
    pub(crate) fn open(path: &Path, capacity: u64) -> std::io::Result<(Self, Vec<Vec<u8>>)> {
        let capacity = capacity.max(HEADER + 4096);
        let existing = match File::options().read(true).write(true).open(path) {
            Ok(file) => Some(file),
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let create = |file: File| -> std::io::Result<(Self, Vec<Vec<u8>>)> {
            allocate(&file, capacity);
            file.write_all_at(&header(1), 0)?;
            file.sync_all()?;
            if let Some(parent) = path.parent() {
                File::open(parent)?.sync_all()?;
            }
            let journal = Self {
                path: path.into(),
                file: Arc::new(file),
                epoch: 1,
                end: HEADER,
                capacity,
                written: HEADER,
                stale: false,
                synced: Arc::new(std::sync::Mutex::new(Synced { epoch: 1, offset: HEADER })),
            };
            Ok((journal, Vec::new()))
        };
        let Some(existing) = existing else {
            return create(File::options().read(true).write(true).create_new(true).open(path)?);
        };
        let mut bytes = Vec::new();
        (&existing).read_to_end(&mut bytes)?;
        if bytes.iter().take(HEADER as usize).all(|b| *b == 0) {
            // Cut off while it was created, before its header was synced: no
            // record can have been written yet.
            return create(existing);
        }
        let magic = bytes.get(..8).filter(|m| *m == MAGIC || *m == MAGIC_1);
        let Some(magic) = magic.filter(|_| bytes.len() >= HEADER as usize) else {
            return Err(corrupt(path, "not a ferry journal (bad header)"));
        };
        let epoch = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
        if bytes[16..24] != checksum(epoch, magic) {
            return Err(corrupt(path, "header checksum mismatch"));
        }
        let mut records = Vec::new();
        let mut at = HEADER as usize;
        if magic == MAGIC_1 {
            while let Some(len) = record_1_at(&bytes, at, epoch) {
                records.push(bytes[at + RECORD_HEAD_1..at + RECORD_HEAD_1 + len].to_vec());
                at += RECORD_HEAD_1 + len;
            }
        } else {
            while let Some((len, _)) = record_at(&bytes, at, epoch) {
                records.push(bytes[at + RECORD_HEAD..at + RECORD_HEAD + len].to_vec());
                at += RECORD_HEAD + len;
            }
            // Past the end: a later record that knew this offset synced.
            let later = (at + 1..bytes.len().saturating_sub(RECORD_HEAD - 1))
                .find(|later| record_at(&bytes, *later, epoch).is_some_and(|(_, synced)| synced > at as u64));
            if let Some(later) = later {
                let damaged = JournalDamaged { path: path.into(), bad: at as u64, later: later as u64 };
                return Err(std::io::Error::new(ErrorKind::InvalidData, damaged));
            }
        }
        let journal = Self {
            path: path.into(),
            file: Arc::new(existing),
            epoch,
            end: at as u64,
            capacity,
            written: at as u64,
            stale: true,
            synced: Arc::new(std::sync::Mutex::new(Synced { epoch, offset: HEADER })),
        };
        Ok((journal, records))
    }

    /// Whether `bytes` more would take the journal past its capacity.
    pub(crate) fn needs_checkpoint(&self, bytes: usize) -> bool {
        self.end > HEADER && self.end + bytes as u64 > self.capacity
    }

    /// Bytes in use, header included.
    #[cfg(test)]
    pub(crate) fn len(&self) -> u64 {
        self.end
    }

    /// The on-disk size of records with these payloads.
    pub(crate) fn record_bytes<'a>(payloads: impl IntoIterator<Item = &'a [u8]>) -> usize {
        payloads.into_iter().map(|p| RECORD_HEAD + p.len()).sum()
    }

    /// Writes one record per payload at the end, in one write. Not durable
    /// until the file is synced (see [`Journal::file`]). A payload may not be empty.
    pub(crate) fn append<'a>(&mut self, payloads: impl IntoIterator<Item = &'a [u8]>) -> std::io::Result<()> {
        if self.stale {
            return Err(std::io::Error::other(format!("journal {}: reset it before appending", self.path.display())));
        }
        let synced = {
            let synced = self.synced.lock().unwrap_or_else(|e| e.into_inner());
            if synced.epoch == self.epoch {
                synced.offset
            } else {
                HEADER
            }
        };
        let mut buf = Vec::new();
        for payload in payloads {
            let len = u32::try_from(payload.len())
                .ok()
                .filter(|l| *l > 0)
                .ok_or_else(|| corrupt(&self.path, "a record must hold 1 byte to 4 GiB"))?;
            buf.extend_from_slice(&len.to_le_bytes());
            buf.extend_from_slice(&record_checksum(self.epoch, synced, payload));
            buf.extend_from_slice(&self.epoch.to_le_bytes());
            buf.extend_from_slice(&synced.to_le_bytes());
            buf.extend_from_slice(payload);
        }
        let end = self.end + buf.len() as u64;
        let written = if end > self.written {
            // The zeros go in the same write, and the same sync.
            let zeroed = (end + ZERO_AHEAD).min(self.capacity).max(end);
            buf.resize((zeroed - self.end) as usize, 0);
            zeroed
        } else {
            self.written
        };
        self.file.write_all_at(&buf, self.end)?;
        self.end = end;
        self.written = written;
        Ok(())
    }

    /// The file as of now, to sync off the lock: every record appended
    /// before this call is durable after [`SyncPoint::sync`].
    pub(crate) fn sync_point(&self) -> SyncPoint {
        SyncPoint { file: self.file.clone(), epoch: self.epoch, offset: self.end, synced: self.synced.clone() }
    }

    /// Starts over, empty: call only when everything the records hold is
    /// durable elsewhere. Old records stay in the file under an old epoch.
    #[cfg(test)]
    pub(crate) fn reset(&mut self) -> std::io::Result<()> {
        self.reset_above(0)
    }

    /// [`Journal::reset`] to an epoch above both this journal's and `floor`,
    /// so records written from now on are known to be newer than any with
    /// an epoch up to `floor` (another journal's).
    pub(crate) fn reset_above(&mut self, floor: u64) -> std::io::Result<()> {
        let epoch = self.epoch.max(floor) + 1;
        self.file.write_all_at(&header(epoch), 0)?;
        self.file.sync_data()?;
        self.epoch = epoch;
        self.end = HEADER;
        self.stale = false;
        *self.synced.lock().unwrap_or_else(|e| e.into_inner()) = Synced { epoch, offset: HEADER };
        Ok(())
    }
}

/// Two journals used in turn, so that a full journal never makes appends
/// wait for a checkpoint: appends go to the active one; when it is full the
/// other takes over (started over with a newer epoch) while a full sync
/// covers what the first holds, in the background. The first may start
/// over only once that sync is done ([`LogStore`] keeps that order).
///
/// [`LogStore`]: crate::LogStore
#[derive(Debug)]
pub(crate) struct Journals {
    files: [Journal; 2],
    active: usize,
}

impl Journals {
    /// Opens (creating if needed) both journals and returns the payloads of
    /// their current records, the older journal's first. Both take appends
    /// only after a [`Journals::reset_all`].
    pub(crate) fn open(paths: [&Path; 2], capacity: u64) -> std::io::Result<(Self, Vec<Vec<u8>>)> {
        let (first, mut records) = Journal::open(paths[0], capacity)?;
        let (second, more) = Journal::open(paths[1], capacity)?;
        if second.epoch < first.epoch {
            records.splice(0..0, more);
        } else {
            records.extend(more);
        }
        Ok((Self { files: [first, second], active: 0 }, records))
    }

    /// The journal appends go to.
    pub(crate) fn active(&mut self) -> &mut Journal {
        &mut self.files[self.active]
    }

    /// Makes the other journal the active one, started over with an epoch
    /// above the current one's. Call only when what the other journal held
    /// is durable elsewhere.
    pub(crate) fn switch(&mut self) -> std::io::Result<()> {
        let floor = self.files[self.active].epoch;
        let next = 1 - self.active;
        self.files[next].reset_above(floor)?;
        self.active = next;
        Ok(())
    }

    /// Starts both over (everything in them is durable elsewhere).
    pub(crate) fn reset_all(&mut self) -> std::io::Result<()> {
        let floor = self.files[0].epoch.max(self.files[1].epoch);
        let (inactive, active) = (1 - self.active, self.active);
        self.files[inactive].reset_above(floor)?;
        let floor = self.files[inactive].epoch;
        self.files[active].reset_above(floor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payloads(records: &[Vec<u8>]) -> Vec<&[u8]> {
        records.iter().map(Vec::as_slice).collect()
    }

    #[test]
    fn two_journals_give_back_the_older_ones_records_first() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        let (mut j, found) = Journals::open([&a, &b], 1 << 20).unwrap();
        assert!(found.is_empty());
        j.reset_all().unwrap();
        j.active().append([b"one".as_slice()]).unwrap();
        j.switch().unwrap();
        j.active().append([b"two".as_slice()]).unwrap();
        j.switch().unwrap();
        // The first journal started over: "one" is gone, "three" is newest.
        j.active().append([b"three".as_slice()]).unwrap();
        drop(j);
        let (mut j, found) = Journals::open([&a, &b], 1 << 20).unwrap();
        assert_eq!(payloads(&found), [b"two".as_slice(), b"three"]);
        j.reset_all().unwrap();
        drop(j);
        let (_, found) = Journals::open([&a, &b], 1 << 20).unwrap();
        assert!(found.is_empty());
    }

    #[test]
    fn records_come_back_in_order_until_a_reset() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("journal");
        let (mut j, found) = Journal::open(&path, 1 << 20).unwrap();
        assert!(found.is_empty());
        j.append([b"one".as_slice(), b"two"]).unwrap();
        j.append([b"three".as_slice()]).unwrap();
        j.sync_point().sync().unwrap();
        drop(j);
        let (mut j, found) = Journal::open(&path, 1 << 20).unwrap();
        assert_eq!(payloads(&found), [b"one".as_slice(), b"two", b"three"]);
        assert!(j.append([b"four".as_slice()]).is_err(), "appends wait for a reset");
        j.reset().unwrap();
        j.append([b"five".as_slice()]).unwrap();
        drop(j);
        // The older, longer records are still in the file but not read.
        let (_, found) = Journal::open(&path, 1 << 20).unwrap();
        assert_eq!(payloads(&found), [b"five".as_slice()]);
    }

    #[test]
    fn reading_stops_at_a_torn_or_damaged_record() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("journal");
        let (mut j, _) = Journal::open(&path, 1 << 20).unwrap();
        j.append([b"kept".as_slice(), b"damaged", b"after"]).unwrap();
        drop(j);
        // Flip a byte of the second record's payload.
        let second = HEADER + (RECORD_HEAD + 4) as u64 + RECORD_HEAD as u64;
        let f = File::options().write(true).open(&path).unwrap();
        f.write_all_at(b"D", second).unwrap();
        let (mut j, found) = Journal::open(&path, 1 << 20).unwrap();
        assert_eq!(payloads(&found), [b"kept".as_slice()]);
        // After the reset, a record as long as the damaged one ends where
        // "after" starts: that intact old record must not be read again.
        j.reset().unwrap();
        j.append([b"kept".as_slice(), b"replace"]).unwrap();
        drop(j);
        let (_, found) = Journal::open(&path, 1 << 20).unwrap();
        assert_eq!(payloads(&found), [b"kept".as_slice(), b"replace"]);
    }

    #[test]
    fn damage_to_a_synced_record_is_refused_not_read_as_the_end() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("journal");
        let (mut j, _) = Journal::open(&path, 1 << 20).unwrap();
        j.append([b"first".as_slice()]).unwrap();
        j.append([b"second".as_slice()]).unwrap();
        j.sync_point().sync().unwrap();
        j.append([b"third".as_slice()]).unwrap();
        j.sync_point().sync().unwrap();
        drop(j);
        // Flip a byte of "second", which was synced before "third" was written.
        let second = HEADER + (RECORD_HEAD + 5 + RECORD_HEAD) as u64;
        let f = File::options().write(true).open(&path).unwrap();
        f.write_all_at(b"S", second).unwrap();
        let err = Journal::open(&path, 1 << 20).unwrap_err();
        let damaged = err.get_ref().and_then(|e| e.downcast_ref::<JournalDamaged>()).expect("JournalDamaged");
        assert_eq!((damaged.bad, damaged.later), (HEADER + (RECORD_HEAD + 5) as u64, second + 6));
        assert!(err.to_string().contains("written after it had been synced"), "{err}");
    }

    #[test]
    fn a_format_1_journal_is_still_read() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("journal");
        let epoch = 3u64;
        let mut bytes = vec![0u8; HEADER as usize];
        bytes[..8].copy_from_slice(MAGIC_1);
        bytes[8..16].copy_from_slice(&epoch.to_le_bytes());
        bytes[16..24].copy_from_slice(&checksum(epoch, MAGIC_1));
        for payload in [b"one".as_slice(), b"two"] {
            bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&checksum(epoch, payload));
            bytes.extend_from_slice(&epoch.to_le_bytes());
            bytes.extend_from_slice(payload);
        }
        std::fs::write(&path, &bytes).unwrap();
        let (mut j, found) = Journal::open(&path, 1 << 20).unwrap();
        assert_eq!(payloads(&found), [b"one".as_slice(), b"two"]);
        // Started over, it writes format 2.
        j.reset().unwrap();
        j.append([b"three".as_slice()]).unwrap();
        drop(j);
        assert_eq!(&std::fs::read(&path).unwrap()[..8], MAGIC);
        let (_, found) = Journal::open(&path, 1 << 20).unwrap();
        assert_eq!(payloads(&found), [b"three".as_slice()]);
    }

    #[test]
    fn a_journal_cut_off_while_it_was_created_starts_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("journal");
        std::fs::write(&path, b"").unwrap();
        let (mut j, found) = Journal::open(&path, 1 << 20).unwrap();
        assert!(found.is_empty());
        j.append([b"one".as_slice()]).unwrap();
        drop(j);
        let (_, found) = Journal::open(&path, 1 << 20).unwrap();
        assert_eq!(payloads(&found), [b"one".as_slice()]);
    }

    #[test]
    fn a_file_that_is_not_a_journal_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("journal");
        std::fs::write(&path, vec![7u8; 100]).unwrap();
        let err = Journal::open(&path, 1 << 20).unwrap_err();
        assert!(err.to_string().contains("not a ferry journal"), "{err}");
    }

    #[test]
    fn a_full_journal_asks_for_a_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(&tmp.path().join("journal"), 8192).unwrap();
        let big = vec![1u8; 5000];
        assert!(!j.needs_checkpoint(Journal::record_bytes([big.as_slice()])), "an empty journal takes anything");
        j.append([big.as_slice()]).unwrap();
        assert!(j.needs_checkpoint(Journal::record_bytes([big.as_slice()])));
        j.reset().unwrap();
        assert!(!j.needs_checkpoint(Journal::record_bytes([big.as_slice()])));
    }
}
