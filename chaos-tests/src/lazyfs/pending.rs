//! One file's changes that no fsync has made durable yet: the bytes written
//! and the size set since the last sync, kept in memory on top of the disk
//! file, which stays as it was when last synced.
//!
//! Written bytes live in a sorted map of extents that never overlap or
//! touch (a write merges with every extent it overlaps or adjoins), so a
//! log appended to in small records grows one extent in amortized O(record)
//! time, and a read or a sync walks only the extents it needs.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// A file as its clients see it: the disk file up to `cut`, zeros from
/// there to `size`, and the written extents over both.
#[derive(Debug)]
pub(super) struct Pending {
    /// The disk file's length when this started. Only a sync changes the
    /// disk file, and a sync ends this `Pending`, so it stays true.
    disk_len: u64,
    /// Disk bytes at and past this offset were cut off by a truncate since
    /// the last sync. Never above `disk_len` or `size`.
    cut: u64,
    /// The file's length as clients see it.
    size: u64,
    /// Written bytes by start offset: never overlapping, never adjoining.
    extents: BTreeMap<u64, Vec<u8>>,
    /// The extents' total length: what a power cut would throw away.
    bytes: u64,
}

impl Pending {
    /// Nothing pending yet on a disk file of `disk_len` bytes.
    pub(super) fn new(disk_len: u64) -> Self {
        Pending { disk_len, cut: disk_len, size: disk_len, extents: BTreeMap::new(), bytes: 0 }
    }

    /// The file's length as clients see it.
    pub(super) fn size(&self) -> u64 {
        self.size
    }

    /// Bytes written and not yet synced.
    pub(super) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Records a write of `data` at `offset`.
    pub(super) fn write(&mut self, offset: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let end = offset + data.len() as u64;
        self.size = self.size.max(end);

        // The extent starting at or before `offset`: overwritten in place if
        // it covers the whole write, else merged below.
        let mut start = offset;
        let mut merged = None;
        if let Some((&left, buf)) = self.extents.range_mut(..=offset).next_back() {
            let left_end = left + buf.len() as u64;
            if left_end >= end {
                let at = (offset - left) as usize;
                buf[at..at + data.len()].copy_from_slice(data);
                return;
            }
            if left_end >= offset {
                if let Some(mut buf) = self.extents.remove(&left) {
                    self.bytes -= buf.len() as u64;
                    buf.truncate((offset - left) as usize);
                    buf.extend_from_slice(data);
                    start = left;
                    merged = Some(buf);
                }
            }
        }
        let mut merged = merged.unwrap_or_else(|| data.to_vec());

        // Extents starting inside or right after the write: absorbed, with
        // whatever of them reaches past its end.
        while let Some(right) = self.extents.range(offset..=end).next().map(|(&s, _)| s) {
            let Some(buf) = self.extents.remove(&right) else { break };
            self.bytes -= buf.len() as u64;
            let right_end = right + buf.len() as u64;
            if right_end > end {
                merged.extend_from_slice(&buf[(end - right) as usize..]);
            }
        }
        self.bytes += merged.len() as u64;
        self.extents.insert(start, merged);
    }

    /// Records a truncate (or extension, with zeros) to `size` bytes.
    pub(super) fn set_size(&mut self, size: u64) {
        if size < self.size {
            let dropped = self.extents.split_off(&size);
            self.bytes -= dropped.values().map(|b| b.len() as u64).sum::<u64>();
            if let Some((&start, buf)) = self.extents.range_mut(..size).next_back() {
                let keep = (size - start) as usize;
                if buf.len() > keep {
                    self.bytes -= (buf.len() - keep) as u64;
                    buf.truncate(keep);
                }
            }
            self.cut = self.cut.min(size);
        }
        self.size = size;
    }

    /// Reads up to `len` bytes at `offset` as clients see them, taking the
    /// unchanged part from the disk file through `read_disk`, which must
    /// fill the whole buffer it is given (it never reaches past `cut`, so
    /// never past the disk file's end).
    pub(super) fn read(
        &self,
        offset: u64,
        len: u32,
        read_disk: impl FnOnce(u64, &mut [u8]) -> io::Result<()>,
    ) -> io::Result<Vec<u8>> {
        if offset >= self.size {
            return Ok(Vec::new());
        }
        let end = self.size.min(offset + u64::from(len));
        let mut out = vec![0; (end - offset) as usize];
        let disk_end = end.min(self.cut);
        if disk_end > offset {
            read_disk(offset, &mut out[..(disk_end - offset) as usize])?;
        }
        let first = self.extents.range(..=offset).next_back().map_or(offset, |(&s, _)| s);
        for (&start, buf) in self.extents.range(first..end) {
            let from = start.max(offset);
            let to = (start + buf.len() as u64).min(end);
            if from < to {
                out[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&buf[(from - start) as usize..(to - start) as usize]);
            }
        }
        Ok(out)
    }

    /// Makes the disk file (opened for writing) what clients see: cuts it,
    /// writes the extents, sets its length. The caller fsyncs it, then
    /// drops this `Pending`; applying twice does no harm, so a failure
    /// half-way can leave it in place.
    pub(super) fn apply(&self, file: &File) -> io::Result<()> {
        if self.cut < self.disk_len {
            file.set_len(self.cut)?;
        }
        let mut len = self.cut;
        for (&start, buf) in &self.extents {
            file.write_all_at(buf, start)?;
            len = len.max(start + buf.len() as u64);
        }
        if len != self.size {
            file.set_len(self.size)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of `disk` with `pending` over it, read whole.
    fn seen(disk: &[u8], pending: &Pending) -> Vec<u8> {
        pending
            .read(0, u32::MAX, |at, buf| {
                buf.copy_from_slice(&disk[at as usize..at as usize + buf.len()]);
                Ok(())
            })
            .unwrap()
    }

    /// The same changes on a plain vector, to compare against.
    fn model_write(file: &mut Vec<u8>, offset: usize, data: &[u8]) {
        if file.len() < offset + data.len() {
            file.resize(offset + data.len(), 0);
        }
        file[offset..offset + data.len()].copy_from_slice(data);
    }

    #[test]
    fn writes_merge_into_non_overlapping_extents() {
        let disk = b"0123456789".to_vec();
        let mut p = Pending::new(10);
        let mut model = disk.clone();
        let steps: &[(usize, &[u8])] =
            &[(2, b"ab"), (4, b"cd"), (12, b"xy"), (1, b"QQQQQQQ"), (11, b"z"), (20, b"end"), (0, b"!")];
        for &(offset, data) in steps {
            p.write(offset as u64, data);
            model_write(&mut model, offset, data);
            assert_eq!(seen(&disk, &p), model, "after writing {data:?} at {offset}");
        }
        // Left: 0..8, 11..14 and 20..23.
        assert_eq!(p.extents.len(), 3);
        assert_eq!(p.bytes(), p.extents.values().map(|b| b.len() as u64).sum::<u64>());
        assert_eq!(p.size(), 23);
    }

    #[test]
    fn appends_grow_one_extent() {
        let mut p = Pending::new(0);
        for i in 0..1000u64 {
            p.write(i * 8, &i.to_le_bytes());
        }
        assert_eq!(p.extents.len(), 1);
        assert_eq!(p.bytes(), 8000);
    }

    #[test]
    fn truncate_hides_disk_bytes_and_extension_reads_zeros() {
        let disk = b"0123456789".to_vec();
        let mut p = Pending::new(10);
        p.write(6, b"abcdef");
        p.set_size(4);
        assert_eq!(seen(&disk, &p), b"0123");
        assert_eq!(p.bytes(), 0);
        p.set_size(8);
        assert_eq!(seen(&disk, &p), b"0123\0\0\0\0");
        p.write(7, b"Z");
        assert_eq!(seen(&disk, &p), b"0123\0\0\0Z");
        assert_eq!(p.bytes(), 1);
    }

    #[test]
    fn partial_reads_overlay_the_right_slice() {
        let disk = b"0123456789".to_vec();
        let mut p = Pending::new(10);
        p.write(3, b"abc");
        let out = p
            .read(4, 4, |at, buf| {
                buf.copy_from_slice(&disk[at as usize..at as usize + buf.len()]);
                Ok(())
            })
            .unwrap();
        assert_eq!(out, b"bc67");
        assert!(p.read(10, 4, |_, _| unreachable!()).unwrap().is_empty());
    }

    #[test]
    fn apply_makes_the_disk_file_what_clients_saw() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"0123456789").unwrap();
        let mut p = Pending::new(10);
        p.set_size(3);
        p.write(5, b"xy");
        p.set_size(9);
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let expected = seen(b"0123456789", &p);
        p.apply(&file).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), expected);
        assert_eq!(expected, b"012\0\0xy\0\0");
    }
}
