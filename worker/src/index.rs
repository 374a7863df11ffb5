//! Indexing a file: content-defined chunks (FastCDC 2020, average 512 KiB) with
//! a BLAKE3 per chunk and for the whole file, in one streaming pass. Memory
//! stays bounded by the largest chunk, whatever the file size. Blocking: run
//! it on a blocking thread.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Smallest chunk.
pub const MIN_CHUNK: usize = 128 * 1024;
/// Target average chunk. Smaller chunks start the swarm sooner (a target
/// serves a chunk once it holds all of it) and move less for a small
/// change; each costs a pull, an fsync of the worker's store and an ack. In
/// `ferry-bench distribute` under tc (200 MB to 20 workers), T/(S/B) was
/// about 1.30 at 512 KiB, 1.35 at 1 MiB and 1.39 at 2 MiB.
pub const AVG_CHUNK: usize = 512 * 1024;
/// Largest chunk.
pub const MAX_CHUNK: usize = 2 * 1024 * 1024;

/// One chunk of an indexed file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChunkRef {
    /// Offset in the file.
    pub offset: u64,
    /// Length.
    pub len: u64,
    /// BLAKE3 of the bytes.
    pub hash: [u8; 32],
}

/// A file's manifest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IndexedFile {
    /// Path as given.
    pub path: String,
    /// Size.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// BLAKE3 of the whole file.
    pub blake3: [u8; 32],
    /// Chunks in order.
    pub chunks: Vec<ChunkRef>,
}

/// Indexes the file at `path` (already checked against the roots).
pub fn index_file(path: &Path) -> std::io::Result<IndexedFile> {
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    let reader = std::io::BufReader::with_capacity(1024 * 1024, file);
    let mut whole = blake3::Hasher::new();
    let mut chunks = Vec::new();
    for chunk in fastcdc::v2020::StreamCDC::new(reader, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK) {
        let chunk = chunk.map_err(|e| std::io::Error::other(format!("chunking {}: {e}", path.display())))?;
        whole.update(&chunk.data);
        chunks.push(ChunkRef {
            offset: chunk.offset,
            len: chunk.length as u64,
            hash: *blake3::hash(&chunk.data).as_bytes(),
        });
    }
    let size: u64 = chunks.iter().map(|c| c.len).sum();
    Ok(IndexedFile {
        path: path.display().to_string(),
        size,
        mode: meta.permissions().mode() & 0o7777,
        blake3: *whole.finalize().as_bytes(),
        chunks,
    })
}

/// Lower-case hex of a hash.
pub fn hex(hash: &[u8; 32]) -> String {
    blake3::Hash::from_bytes(*hash).to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_file_and_a_local_edit_changes_few_chunks() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        let mut data = vec![0u8; 20 * 1024 * 1024];
        let mut x: u64 = 0x9E3779B97F4A7C15;
        for b in data.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        std::fs::write(&path, &data).unwrap();
        let a = index_file(&path).unwrap();
        assert_eq!(a.size, data.len() as u64);
        assert_eq!(a.blake3, *blake3::hash(&data).as_bytes());
        let mut next = 0;
        for c in &a.chunks {
            assert_eq!(c.offset, next);
            assert!(c.len <= MAX_CHUNK as u64);
            assert_eq!(c.hash, *blake3::hash(&data[c.offset as usize..(c.offset + c.len) as usize]).as_bytes());
            next += c.len;
        }
        // Change 64 KiB in the middle: most chunks keep their hashes.
        for b in &mut data[10 * 1024 * 1024..10 * 1024 * 1024 + 65536] {
            *b = b.wrapping_add(1);
        }
        std::fs::write(&path, &data).unwrap();
        let b = index_file(&path).unwrap();
        let old: std::collections::HashSet<_> = a.chunks.iter().map(|c| c.hash).collect();
        let changed: u64 = b.chunks.iter().filter(|c| !old.contains(&c.hash)).map(|c| c.len).sum();
        assert!(changed <= 2 * MAX_CHUNK as u64, "changed {changed} bytes");

        let empty = tmp.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        let e = index_file(&empty).unwrap();
        assert_eq!((e.size, e.chunks.len()), (0, 0));
        assert_eq!(e.blake3, *blake3::hash(b"").as_bytes());
    }
}
