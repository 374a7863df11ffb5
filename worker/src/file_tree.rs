//! The whole-file BLAKE3 of a file that arrives out of order.
//!
//! BLAKE3 hashes a file as a binary tree, and every block of [`LEAF`] bytes
//! that starts at a multiple of [`LEAF`] is a subtree of that tree whose
//! chaining value can be computed on its own (`blake3::hazmat`). A target
//! hashes each such leaf as soon as the chunks covering it are written,
//! reading the bytes back from its staging file while later chunks are
//! still arriving, and pack hashes only the leaves still missing before it
//! merges them into the file's hash. The check is the same as hashing the
//! whole staging file at pack (the bytes are read back from the file, not
//! taken from the network), but it no longer waits until the end, where
//! every target of a job used to hash its whole file at the same moment: in
//! `ferry-bench distribute` (20 targets of 200 MB on two cores) that took
//! 0.3-1.1 s per target, all at the end of the push.

use std::ops::Range;

use blake3::hazmat::{left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode};

/// Bytes per leaf: a power of two, at least BLAKE3's 1 KiB chunk, well
/// below the smallest content-defined chunk (so most leaves lie inside one
/// chunk and a few straddle two).
pub const LEAF: u64 = 64 * 1024;

/// Leaves of one file, each hashed or not yet.
#[derive(Debug, Clone)]
pub struct FileTree {
    size: u64,
    /// Empty when the whole file fits in one leaf: a tree of one node has
    /// no chaining values, only the root hash.
    leaves: Vec<Option<ChainingValue>>,
}

impl FileTree {
    /// A tree for a file of `size` bytes with no leaf hashed.
    pub fn new(size: u64) -> Self {
        let leaves = if size > LEAF { size.div_ceil(LEAF) as usize } else { 0 };
        Self { size, leaves: vec![None; leaves] }
    }

    /// Frees the leaves (a job's files stay known after it ends). The tree
    /// is then one of an empty file: do not ask it for a root.
    pub fn release(&mut self) {
        *self = Self::new(0);
    }

    /// The bytes leaf `i` covers.
    pub fn leaf_range(&self, i: usize) -> Range<u64> {
        let start = i as u64 * LEAF;
        start..(start + LEAF).min(self.size)
    }

    /// The leaves wholly inside `held` (bytes known to be written), from the
    /// first to the last that is not hashed yet; empty when there are none.
    pub fn unhashed_within(&self, held: Range<u64>) -> Range<usize> {
        let end = held.end.min(self.size);
        if self.leaves.is_empty() || held.start >= end {
            return 0..0;
        }
        let first = held.start.div_ceil(LEAF) as usize;
        // The last leaf may be short: it ends at the file's end.
        let last = if end == self.size { self.leaves.len() } else { (end / LEAF) as usize };
        let mut leaves = first..last.max(first);
        while leaves.start < leaves.end && self.leaves[leaves.start].is_some() {
            leaves.start += 1;
        }
        while leaves.end > leaves.start && self.leaves[leaves.end - 1].is_some() {
            leaves.end -= 1;
        }
        leaves
    }

    /// Hashes the leaves `leaves` from `bytes`, which start at the first
    /// leaf's offset and cover them all. Leaves already hashed are kept.
    pub fn hash_leaves(&mut self, leaves: Range<usize>, bytes: &[u8]) {
        let Some(base) = leaves.clone().next().map(|i| self.leaf_range(i).start) else { return };
        for i in leaves {
            let range = self.leaf_range(i);
            let (from, to) = ((range.start - base) as usize, (range.end - base) as usize);
            if self.leaves[i].is_none() && to <= bytes.len() {
                self.leaves[i] = Some(leaf_cv(range.start, &bytes[from..to]));
            }
        }
    }

    /// The file's BLAKE3. Leaves not hashed yet are read with `read`
    /// (`read(range, buf)` fills `buf` with the bytes of `range`), in runs
    /// of up to 4 MiB.
    pub fn root(
        &mut self,
        mut read: impl FnMut(Range<u64>, &mut Vec<u8>) -> std::io::Result<()>,
    ) -> std::io::Result<[u8; 32]> {
        let mut buf = Vec::new();
        if self.leaves.is_empty() {
            read(0..self.size, &mut buf)?;
            return Ok(*blake3::hash(&buf).as_bytes());
        }
        const RUN: usize = (4 * 1024 * 1024 / LEAF) as usize;
        let mut i = 0;
        while i < self.leaves.len() {
            if self.leaves[i].is_some() {
                i += 1;
                continue;
            }
            let mut end = i + 1;
            while end < self.leaves.len() && end - i < RUN && self.leaves[end].is_none() {
                end += 1;
            }
            read(self.leaf_range(i).start..self.leaf_range(end - 1).end, &mut buf)?;
            self.hash_leaves(i..end, &buf);
            i = end;
        }
        let left = left_subtree_len(self.size);
        let root = merge_subtrees_root(&self.subtree(0, left), &self.subtree(left, self.size - left), Mode::Hash);
        Ok(*root.as_bytes())
    }

    /// The chaining value of the subtree of `len` bytes at `offset`: one
    /// leaf, or two subtrees split where BLAKE3 splits them. Every leaf is
    /// hashed (see [`FileTree::root`]).
    fn subtree(&self, offset: u64, len: u64) -> ChainingValue {
        if len <= LEAF {
            return self.leaves[(offset / LEAF) as usize].unwrap_or_default();
        }
        let left = left_subtree_len(len);
        merge_subtrees_non_root(&self.subtree(offset, left), &self.subtree(offset + left, len - left), Mode::Hash)
    }
}

/// The chaining value of one leaf: `bytes` at `offset` in the file.
fn leaf_cv(offset: u64, bytes: &[u8]) -> ChainingValue {
    let mut hasher = blake3::Hasher::new();
    hasher.set_input_offset(offset);
    hasher.update(bytes);
    hasher.finalize_non_root()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn reader(bytes: &[u8]) -> impl FnMut(Range<u64>, &mut Vec<u8>) -> std::io::Result<()> + '_ {
        |r, buf| {
            buf.clear();
            buf.extend_from_slice(&bytes[r.start as usize..r.end as usize]);
            Ok(())
        }
    }

    #[test]
    fn the_root_is_blake3_of_the_file_for_every_size() {
        let leaf = LEAF as usize;
        for len in [0, 1, 1023, 1024, 1025, leaf - 1, leaf, leaf + 1, 2 * leaf, 3 * leaf + 5, 17 * leaf + 4097] {
            let bytes = data(len, len as u64);
            let got = FileTree::new(len as u64).root(reader(&bytes)).unwrap();
            assert_eq!(got, *blake3::hash(&bytes).as_bytes(), "size {len}");
        }
    }

    #[test]
    fn leaves_hashed_as_chunks_land_in_any_order_give_the_same_root() {
        let bytes = data(40 * LEAF as usize + 333, 7);
        let size = bytes.len() as u64;
        // Content-defined chunks do not line up with leaves.
        let mut cuts = vec![0u64];
        let mut x = 11u64;
        while *cuts.last().unwrap() < size {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            cuts.push((cuts.last().unwrap() + 20_000 + (x >> 40) % 200_000).min(size));
        }
        let chunks: Vec<Range<u64>> = cuts.windows(2).map(|w| w[0]..w[1]).collect();
        let mut order: Vec<usize> = (0..chunks.len()).collect();
        order.reverse();
        order.swap(1, 4);
        let mut tree = FileTree::new(size);
        let mut held = vec![false; chunks.len()];
        for &c in &order {
            held[c] = true;
            // What a target knows is written: this chunk and its held neighbours.
            let (mut a, mut b) = (c, c);
            while a > 0 && held[a - 1] {
                a -= 1;
            }
            while b + 1 < chunks.len() && held[b + 1] {
                b += 1;
            }
            let leaves = tree.unhashed_within(chunks[a].start..chunks[b].end);
            if !leaves.is_empty() {
                let r = tree.leaf_range(leaves.start).start..tree.leaf_range(leaves.end - 1).end;
                tree.hash_leaves(leaves, &bytes[r.start as usize..r.end as usize]);
            }
        }
        assert!(tree.leaves.iter().all(Option::is_some), "every leaf hashed before pack");
        let mut reads = 0;
        let got = tree
            .root(|_, _| {
                reads += 1;
                Ok(())
            })
            .unwrap();
        assert_eq!(reads, 0);
        assert_eq!(got, *blake3::hash(&bytes).as_bytes());
    }

    #[test]
    fn a_changed_byte_changes_the_root() {
        let mut bytes = data(5 * LEAF as usize, 3);
        let mut tree = FileTree::new(bytes.len() as u64);
        let leaves = tree.unhashed_within(0..LEAF * 2);
        assert_eq!(leaves, 0..2);
        tree.hash_leaves(leaves, &bytes[..2 * LEAF as usize]);
        let expected = *blake3::hash(&bytes).as_bytes();
        // A byte of a leaf pack still has to read.
        bytes[4 * LEAF as usize + 9] ^= 1;
        assert_ne!(tree.clone().root(reader(&bytes)).unwrap(), expected);
        // A byte of a leaf hashed earlier, changed after: pack trusts the
        // earlier read, so the root is the one of the bytes read then.
        bytes[4 * LEAF as usize + 9] ^= 1;
        bytes[5] ^= 1;
        assert_eq!(tree.root(reader(&bytes)).unwrap(), expected);
    }

    #[test]
    fn leaves_partly_outside_what_is_held_are_not_hashed() {
        let tree = FileTree::new(10 * LEAF + 7);
        assert_eq!(tree.unhashed_within(1..LEAF * 3 - 1), 1..2);
        assert_eq!(tree.unhashed_within(LEAF * 9..LEAF * 10 + 7), 9..11);
        assert_eq!(tree.unhashed_within(LEAF * 9 + 1..LEAF * 10 + 7), 10..11);
        assert!(tree.unhashed_within(5..LEAF).is_empty());
        assert!(FileTree::new(LEAF).unhashed_within(0..LEAF).is_empty());
    }
}
