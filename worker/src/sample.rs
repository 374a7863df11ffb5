//! Sample data for `ferry demo` and `ferry-bench`: files of pseudo-random
//! bytes (xorshift64), the same for the same seed, which neither
//! compress nor share chunks with each other.

use std::io::Write;
use std::path::Path;

/// Writes `len` pseudo-random bytes to a new file at `path`, a mebibyte at
/// a time (no buffer of the file's size).
pub fn write_random(path: &Path, len: u64, seed: u64) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut x = seed | 1;
    let mut block = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for word in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes()[..word.len()]);
        }
        let n = left.min(block.len() as u64) as usize;
        out.write_all(&block[..n])?;
        left -= n as u64;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_writes_the_same_bytes_and_another_seed_others() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("c"));
        write_random(&a, 3 * (1 << 20) + 5, 1).unwrap();
        write_random(&b, 3 * (1 << 20) + 5, 1).unwrap();
        write_random(&c, 3 * (1 << 20) + 5, 2).unwrap();
        let (a, b, c) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap(), std::fs::read(c).unwrap());
        assert_eq!(a.len(), 3 * (1 << 20) + 5);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a[..1 << 20], a[1 << 20..2 << 20], "the blocks differ");
    }
}
