//! The snapshot file format.
//!
//! A snapshot file is `FERRYSNP`, then length-prefixed frames (u32 LE length +
//! [`crate::codec`] bytes): one [`Header`], any number of [`Record`]s, and a
//! final [`Record::End`] with the record count, so a truncated file is
//! detected. Files are written as `*.tmp`, fsynced, then renamed into place.

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

const MAGIC: &[u8; 8] = b"FERRYSNP";
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

/// Writes frames to a file.
pub(crate) struct Writer<W: Write> {
    out: BufWriter<W>,
    records: u64,
}

impl<W: Write> Writer<W> {
    pub(crate) fn new(inner: W, header: &Header) -> Result<Self, Error> {
        let mut w = Self { out: BufWriter::with_capacity(256 * 1024, inner), records: 0 };
        w.out.write_all(MAGIC).map_err(io_err("write"))?;
        w.frame(&codec::encode("snapshot header", header)?)?;
        Ok(w)
    }

    fn frame(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.out.write_all(&(bytes.len() as u32).to_le_bytes()).map_err(io_err("write"))?;
        self.out.write_all(bytes).map_err(io_err("write"))
    }

    pub(crate) fn record(&mut self, record: &Record) -> Result<(), Error> {
        self.records += 1;
        self.frame(&codec::encode("snapshot record", record)?)
    }

    /// Writes the end marker and returns the inner writer, flushed.
    pub(crate) fn finish(mut self) -> Result<W, Error> {
        let end = Record::End { records: self.records };
        self.frame(&codec::encode("snapshot record", &end)?)?;
        self.out.into_inner().map_err(|e| Error::Snapshot { op: "flush", source: e.into_error() })
    }
}

/// Reads frames from a file.
pub(crate) struct Reader<R: Read> {
    input: BufReader<R>,
    records: u64,
    done: bool,
}

impl<R: Read> Reader<R> {
    pub(crate) fn new(inner: R) -> Result<(Self, Header), Error> {
        let mut r = Self { input: BufReader::with_capacity(256 * 1024, inner), records: 0, done: false };
        let mut magic = [0u8; 8];
        r.input.read_exact(&mut magic).map_err(io_err("read"))?;
        if &magic != MAGIC {
            return Err(Error::Snapshot {
                op: "read",
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not a ferry snapshot (bad magic)"),
            });
        }
        let header = codec::decode("snapshot header", &r.frame()?)?;
        Ok((r, header))
    }

    fn frame(&mut self) -> Result<Vec<u8>, Error> {
        let mut len = [0u8; 4];
        self.input.read_exact(&mut len).map_err(io_err("read"))?;
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(Error::Snapshot {
                op: "read",
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("frame of {len} bytes is too large"),
                ),
            });
        }
        let mut buf = vec![0u8; len];
        self.input.read_exact(&mut buf).map_err(io_err("read"))?;
        Ok(buf)
    }

    /// The next record, or `None` after a valid end marker.
    pub(crate) fn next_record(&mut self) -> Result<Option<Record>, Error> {
        if self.done {
            return Ok(None);
        }
        match codec::decode_upgraded("snapshot record", &self.frame()?)? {
            Record::End { records } => {
                if records != self.records {
                    return Err(Error::Snapshot {
                        op: "read",
                        source: std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("snapshot ends after {} records but says {records}", self.records),
                        ),
                    });
                }
                self.done = true;
                if self.input.fill_buf().map_err(io_err("read"))?.is_empty() {
                    Ok(None)
                } else {
                    Err(Error::Snapshot {
                        op: "read",
                        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "trailing bytes after end"),
                    })
                }
            }
            record => {
                self.records += 1;
                Ok(Some(record))
            }
        }
    }
}

/// Reads a whole snapshot file and checks its framing (magic, header, every
/// record, end marker with the right count, nothing after it), without
/// keeping it in memory. A receiver runs this before handing a snapshot to
/// openraft, for which a failed install is fatal. Returns the record count.
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

    fn header() -> Header {
        Header {
            meta: SnapshotMeta { last_log_id: None, last_membership: Default::default(), snapshot_id: "s".into() },
            revision: 7,
        }
    }

    #[test]
    fn round_trip_and_truncation_is_detected() {
        let mut w = Writer::new(Vec::new(), &header()).unwrap();
        for i in 0..3u64 {
            let value = StoredValue { value: vec![i as u8; 10], create_revision: i, mod_revision: i, version: 1 };
            w.record(&Record::Kv { key: format!("k{i}"), value }).unwrap();
        }
        let bytes = w.finish().unwrap();

        let (mut r, h) = Reader::new(&bytes[..]).unwrap();
        assert_eq!(h.revision, 7);
        let mut n = 0;
        while let Some(rec) = r.next_record().unwrap() {
            assert!(matches!(rec, Record::Kv { .. }));
            n += 1;
        }
        assert_eq!(n, 3);

        let cut = &bytes[..bytes.len() - 3];
        let (mut r, _) = Reader::new(cut).unwrap();
        let mut result = Ok(Some(Record::End { records: 0 }));
        while let Ok(Some(_)) = result {
            result = r.next_record();
        }
        assert!(result.is_err(), "a truncated snapshot must not read as complete");

        let mut whole = tempfile::tempfile().unwrap();
        whole.write_all(&bytes).unwrap();
        assert_eq!(verify(&mut whole).unwrap(), 3);
        let mut cut_file = tempfile::tempfile().unwrap();
        cut_file.write_all(cut).unwrap();
        assert!(verify(&mut cut_file).is_err());
    }
}
