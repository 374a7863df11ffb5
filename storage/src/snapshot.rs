//! The snapshot file format.
//!
//! Files are written as `*.tmp`, fsynced, then renamed into place. The
//! magic names the file format's version; [`Writer`] always writes the
//! newest, [`Reader`] reads every version. (This version is the file's
//! framing only; the records inside are [`crate::codec`] bytes, which carry
//! their own encoding version.)
//!
//! Format 2 (`FERRYSN2`), written today:
//!
//! ```text
//! magic      8 bytes   "FERRYSN2"
//! frame *    4 bytes   payload length n, u32 LE
//!            8 bytes   first 8 bytes of blake3(length ‖ payload)
//!            n bytes   payload: crate::codec bytes
//! trailer   32 bytes   blake3 of every byte before the trailer
//! ```
//!
//! The frames are one [`Header`] (frame 0), any number of [`Record`]s
//! (frames 1, 2, …), and a final [`Record::End`] with the record count, so a
//! truncated file is detected. The reader checks each frame's checksum
//! before decoding it ("snapshot frame N checksum mismatch"), so a flipped
//! byte never decodes into a valid-looking value, and the whole-file
//! checksum on reaching the end, which also catches frames that are each
//! intact but reordered, duplicated or replaced. Nothing may follow the
//! trailer.
//!
//! Format 1 (`FERRYSNP`), still read: the same frames without their
//! checksums (4 bytes length, then the payload), and no trailer after the
//! end marker. Only framing and the end marker's count protect it.

use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::Path;

use openraft::{BasicNode, SnapshotMeta};
use serde::{Deserialize, Serialize};

use crate::codec;
use crate::command::CommandResult;
use crate::error::Error;
use crate::jobs::{Job, WorkerRecord};
use crate::kv::StoredValue;
use crate::NodeId;

/// Format 1's magic: frames without checksums, no trailer.
const MAGIC_V1: &[u8; 8] = b"FERRYSNP";
/// Format 2's magic: checksummed frames and a whole-file trailer.
const MAGIC_V2: &[u8; 8] = b"FERRYSN2";
/// Bytes of a frame's checksum (a truncated blake3).
const FRAME_SUM: usize = 8;
/// Largest frame a reader accepts: a key and value at their limits, with room.
const MAX_FRAME: usize = 8 * 1024 * 1024;

/// The first frame of a snapshot file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Header {
    pub meta: SnapshotMeta<NodeId, BasicNode>,
    pub revision: u64,
}

/// Everything after the header.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Record {
    Kv {
        key: String,
        value: StoredValue,
    },
    Dedup {
        request_id: String,
        index: u64,
        result: CommandResult,
    },
    End {
        records: u64,
    },
    Worker(WorkerRecord),
    Job(Box<Job>),
    /// Format 1's history event. Never written; read as an error.
    OldEvent,
    /// A lease and its keys.
    Lease(crate::kv::Lease),
    /// The gray variants of a key.
    Gray {
        key: String,
        variants: Vec<crate::kv::Variant>,
    },
    /// Format 1's history base. Never written; read as an error.
    OldBase,
    /// One change in the key history, at its revision, with the key's
    /// state before it.
    Change {
        revision: u64,
        change: crate::state_machine::Change,
    },
    /// A probe definition.
    ProbeDef(crate::probes::ProbeDef),
    /// One worker's latest results for a probe.
    ProbeResults {
        probe: String,
        state: crate::probes::WorkerProbe,
    },
}

fn io_err(op: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |source| Error::Snapshot { op, source }
}

/// A read error for bytes that are not a valid snapshot.
fn invalid(reason: impl Into<String>) -> Error {
    Error::Snapshot { op: "read", source: std::io::Error::new(std::io::ErrorKind::InvalidData, reason.into()) }
}

/// A format 2 frame's checksum: the first bytes of blake3 over its length
/// prefix and payload.
fn frame_sum(len: &[u8; 4], payload: &[u8]) -> [u8; FRAME_SUM] {
    codec::checksum(&[len, payload])
}

/// Writes frames to a file, in format 2.
pub(crate) struct Writer<W: Write> {
    out: BufWriter<W>,
    records: u64,
    /// Every byte written so far, for the trailer.
    file_sum: blake3::Hasher,
}

impl<W: Write> Writer<W> {
    pub(crate) fn new(inner: W, header: &Header) -> Result<Self, Error> {
        let mut w =
            Self { out: BufWriter::with_capacity(256 * 1024, inner), records: 0, file_sum: blake3::Hasher::new() };
        w.put(MAGIC_V2)?;
        w.frame(&codec::encode("snapshot header", header)?)?;
        Ok(w)
    }

    /// Writes bytes that the trailer covers.
    fn put(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.file_sum.update(bytes);
        self.out.write_all(bytes).map_err(io_err("write"))
    }

    fn frame(&mut self, bytes: &[u8]) -> Result<(), Error> {
        let len = (bytes.len() as u32).to_le_bytes();
        self.put(&len)?;
        self.put(&frame_sum(&len, bytes))?;
        self.put(bytes)
    }

    pub(crate) fn record(&mut self, record: &Record) -> Result<(), Error> {
        self.records += 1;
        self.frame(&codec::encode("snapshot record", record)?)
    }

    /// Writes the end marker and the trailer, and returns the inner writer,
    /// flushed.
    pub(crate) fn finish(mut self) -> Result<W, Error> {
        let end = Record::End { records: self.records };
        self.frame(&codec::encode("snapshot record", &end)?)?;
        let trailer = self.file_sum.finalize();
        self.out.write_all(trailer.as_bytes()).map_err(io_err("write"))?;
        self.out.into_inner().map_err(|e| Error::Snapshot { op: "flush", source: e.into_error() })
    }
}

/// Reads frames from a file of any format version.
pub(crate) struct Reader<R: Read> {
    input: BufReader<R>,
    records: u64,
    done: bool,
    /// Frames read so far, header included, to name a bad one.
    frames: u64,
    /// Format 2: every byte read so far, for the trailer. `None` for
    /// format 1, which has no checksums.
    file_sum: Option<blake3::Hasher>,
}

impl<R: Read> Reader<R> {
    pub(crate) fn new(inner: R) -> Result<(Self, Header), Error> {
        let mut r = Self {
            input: BufReader::with_capacity(256 * 1024, inner),
            records: 0,
            done: false,
            frames: 0,
            file_sum: None,
        };
        let mut magic = [0u8; 8];
        r.input.read_exact(&mut magic).map_err(io_err("read"))?;
        if &magic == MAGIC_V2 {
            r.file_sum = Some(blake3::Hasher::new());
            r.take(&magic);
        } else if &magic != MAGIC_V1 {
            return Err(invalid("not a ferry snapshot (bad magic)"));
        }
        let header = codec::decode("snapshot header", &r.frame()?)?;
        Ok((r, header))
    }

    /// Adds bytes read to the whole-file checksum (format 2).
    fn take(&mut self, bytes: &[u8]) {
        if let Some(sum) = &mut self.file_sum {
            sum.update(bytes);
        }
    }

    /// The next frame's payload, its checksum checked in format 2.
    fn frame(&mut self) -> Result<Vec<u8>, Error> {
        let n = self.frames;
        self.frames += 1;
        let mut len = [0u8; 4];
        self.input.read_exact(&mut len).map_err(io_err("read"))?;
        self.take(&len);
        let size = u32::from_le_bytes(len) as usize;
        if size > MAX_FRAME {
            return Err(invalid(format!("frame of {size} bytes is too large")));
        }
        let mut sum = [0u8; FRAME_SUM];
        if self.file_sum.is_some() {
            self.input.read_exact(&mut sum).map_err(io_err("read"))?;
            self.take(&sum);
        }
        let mut buf = vec![0u8; size];
        self.input.read_exact(&mut buf).map_err(io_err("read"))?;
        self.take(&buf);
        if self.file_sum.is_some() && frame_sum(&len, &buf) != sum {
            return Err(invalid(format!("snapshot frame {n} checksum mismatch")));
        }
        Ok(buf)
    }

    /// Format 2: reads the trailer and checks it against every byte before.
    fn check_trailer(&mut self) -> Result<(), Error> {
        let Some(sum) = self.file_sum.as_ref().map(blake3::Hasher::finalize) else {
            return Ok(());
        };
        let mut trailer = [0u8; blake3::OUT_LEN];
        self.input.read_exact(&mut trailer).map_err(io_err("read"))?;
        if sum != blake3::Hash::from(trailer) {
            return Err(invalid("snapshot file checksum mismatch"));
        }
        Ok(())
    }

    /// The next record, or `None` after a valid end marker (and, in
    /// format 2, a matching whole-file checksum).
    pub(crate) fn next_record(&mut self) -> Result<Option<Record>, Error> {
        if self.done {
            return Ok(None);
        }
        match codec::decode_upgraded("snapshot record", &self.frame()?)? {
            Record::End { records } => {
                self.check_trailer()?;
                if records != self.records {
                    return Err(invalid(format!("snapshot ends after {} records but says {records}", self.records)));
                }
                if self.input.fill_buf().map_err(io_err("read"))?.is_empty() {
                    self.done = true;
                    Ok(None)
                } else {
                    Err(invalid("trailing bytes after end"))
                }
            }
            record => {
                self.records += 1;
                Ok(Some(record))
            }
        }
    }
}

/// Reads a whole snapshot file and checks it (magic, header, every record,
/// end marker with the right count, nothing after it; in format 2 every
/// frame's checksum and the whole file's), without keeping it in memory. A
/// receiver runs this before handing a snapshot to openraft, for which a
/// failed install is fatal. Returns the record count.
pub fn verify(file: &mut std::fs::File) -> Result<u64, Error> {
    use std::io::Seek;
    file.seek(std::io::SeekFrom::Start(0)).map_err(io_err("seek"))?;
    let mut n = 0;
    {
        let (mut reader, _) = Reader::new(&mut *file)?;
        while reader.next_record()?.is_some() {
            n += 1;
        }
    }
    file.seek(std::io::SeekFrom::Start(0)).map_err(io_err("seek"))?;
    Ok(n)
}

/// fsyncs a directory so a rename inside it is durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), Error> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("sync directory"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEEDLE: &[u8] = b"needle:0123456789";

    fn header() -> Header {
        Header {
            meta: SnapshotMeta { last_log_id: None, last_membership: Default::default(), snapshot_id: "s".into() },
            revision: 7,
        }
    }

    fn kv(i: u64, value: &[u8]) -> Record {
        let value = StoredValue { value: value.to_vec(), create_revision: i, mod_revision: i, version: 1 };
        Record::Kv { key: format!("k{i}"), value }
    }

    /// Three key records; the second holds [`NEEDLE`] so a test can find
    /// its bytes in the file.
    fn records() -> Vec<Record> {
        vec![kv(0, &[0; 10]), kv(1, NEEDLE), kv(2, &[2; 10])]
    }

    fn write(records: &[Record]) -> Vec<u8> {
        let mut w = Writer::new(Vec::new(), &header()).unwrap();
        for r in records {
            w.record(r).unwrap();
        }
        w.finish().unwrap()
    }

    /// Every record of a file, as key and value, or the first error.
    fn read(bytes: &[u8]) -> Result<Vec<(String, Vec<u8>)>, Error> {
        let (mut r, h) = Reader::new(bytes)?;
        assert_eq!(h.revision, 7);
        let mut out = Vec::new();
        while let Some(record) = r.next_record()? {
            match record {
                Record::Kv { key, value } => out.push((key, value.value)),
                other => panic!("unexpected record {other:?}"),
            }
        }
        Ok(out)
    }

    fn verify_bytes(bytes: &[u8]) -> Result<u64, Error> {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(bytes).unwrap();
        verify(&mut file)
    }

    fn expected() -> Vec<(String, Vec<u8>)> {
        vec![("k0".into(), vec![0; 10]), ("k1".into(), NEEDLE.to_vec()), ("k2".into(), vec![2; 10])]
    }

    /// Where each frame of a format 2 file lies, header first.
    fn frames(bytes: &[u8]) -> Vec<std::ops::Range<usize>> {
        let (mut at, end, mut out) = (MAGIC_V2.len(), bytes.len() - blake3::OUT_LEN, Vec::new());
        while at < end {
            let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            out.push(at..at + 4 + FRAME_SUM + len);
            at += 4 + FRAME_SUM + len;
        }
        out
    }

    /// A file as format 1 wrote it: magic, unchecked frames, end marker.
    fn format_1(records: &[Record]) -> Vec<u8> {
        let mut out = MAGIC_V1.to_vec();
        let mut frame = |bytes: Vec<u8>| {
            out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            out.extend_from_slice(&bytes);
        };
        frame(codec::encode("snapshot header", &header()).unwrap());
        for r in records {
            frame(codec::encode("snapshot record", r).unwrap());
        }
        frame(codec::encode("snapshot record", &Record::End { records: records.len() as u64 }).unwrap());
        out
    }

    #[test]
    fn format_2_round_trip_and_truncation_is_detected() {
        let bytes = write(&records());
        assert_eq!(&bytes[..8], MAGIC_V2);
        assert_eq!(read(&bytes).unwrap(), expected());
        assert_eq!(verify_bytes(&bytes).unwrap(), 3);

        // Inside the trailer, the whole trailer, inside a record.
        for cut in [3, blake3::OUT_LEN, bytes.len() / 2] {
            let cut = &bytes[..bytes.len() - cut];
            assert!(
                read(cut).is_err(),
                "a snapshot cut by {} bytes must not read as complete",
                bytes.len() - cut.len()
            );
            assert!(verify_bytes(cut).is_err());
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(read(&longer).unwrap_err().to_string().contains("trailing bytes after end"));
    }

    #[test]
    fn flipped_byte_in_a_value_fails_its_frame_checksum() {
        let mut bytes = write(&records());
        let at = bytes.windows(NEEDLE.len()).position(|w| w == NEEDLE).unwrap();
        bytes[at + 3] ^= 0x01;

        // Header is frame 0, so k1 is frame 2.
        let err = read(&bytes).unwrap_err().to_string();
        assert!(err.contains("snapshot frame 2 checksum mismatch"), "{err}");
        let err = verify_bytes(&bytes).unwrap_err().to_string();
        assert!(err.contains("snapshot frame 2 checksum mismatch"), "{err}");
    }

    #[test]
    fn intact_frames_in_a_changed_file_fail_the_file_checksum() {
        let bytes = write(&records());
        let f = frames(&bytes);
        assert_eq!(f.len(), 5, "header, three records, end");
        let body = |order: &[usize]| {
            let mut out = MAGIC_V2.to_vec();
            for &i in order {
                out.extend_from_slice(&bytes[f[i].clone()]);
            }
            out.extend_from_slice(&bytes[bytes.len() - blake3::OUT_LEN..]);
            out
        };

        // A value changed and its frame checksum recomputed.
        let mut changed = bytes.clone();
        let at = changed.windows(NEEDLE.len()).position(|w| w == NEEDLE).unwrap();
        changed[at + 3] ^= 0x01;
        let frame = f[2].clone();
        let len: [u8; 4] = changed[frame.start..frame.start + 4].try_into().unwrap();
        let sum = frame_sum(&len, &changed[frame.start + 4 + FRAME_SUM..frame.end]);
        changed[frame.start + 4..frame.start + 4 + FRAME_SUM].copy_from_slice(&sum);
        // Two records swapped, and one duplicated.
        for file in [changed, body(&[0, 2, 1, 3, 4]), body(&[0, 1, 2, 2, 3, 4])] {
            let err = read(&file).unwrap_err().to_string();
            assert!(err.contains("snapshot file checksum mismatch"), "{err}");
            assert!(verify_bytes(&file).is_err());
        }
    }

    #[test]
    fn flipped_byte_in_the_trailer_fails_the_file_checksum() {
        let mut bytes = write(&records());
        let last = bytes.len() - 1;
        bytes[last] ^= 0x80;
        let err = read(&bytes).unwrap_err().to_string();
        assert!(err.contains("snapshot file checksum mismatch"), "{err}");
        assert!(verify_bytes(&bytes).is_err());
    }

    #[test]
    fn format_1_still_reads() {
        let bytes = format_1(&records());
        assert_eq!(read(&bytes).unwrap(), expected());
        assert_eq!(verify_bytes(&bytes).unwrap(), 3);

        let cut = &bytes[..bytes.len() - 3];
        assert!(read(cut).is_err());
        assert!(verify_bytes(cut).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(read(&longer).is_err());
    }

    #[test]
    fn bad_magic_is_named() {
        let mut bytes = write(&records());
        bytes[7] = b'9';
        let err = read(&bytes).unwrap_err().to_string();
        assert!(err.contains("bad magic"), "{err}");
    }
}
