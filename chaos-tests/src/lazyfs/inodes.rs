//! The tables behind the mount: our inode numbers for the disk inodes the
//! kernel knows (each with its pending changes), and the open files and
//! directories by handle.
//!
//! Inodes are keyed by the disk inode's (device, number), so two names for
//! one file (a hard link, or a name found again after a rename) are one
//! inode with one set of pending changes. An inode goes when the kernel has
//! forgotten it and no handle is open on it — unless it still has pending
//! changes for a file that is still on disk: those must survive until a
//! sync or a power cut, whether or not the kernel keeps the inode cached.
//!
//! Locking: `Tables` first, then one inode's `pending`, never the other way
//! round; no disk I/O other than an `fstat` happens under `Tables`.
//!
//! A power cut first waits for the operations that change pending data to
//! finish: one a killed process left behind (the kernel had handed it to us
//! before the kill) must land before the cut, not after it, where the
//! restarted process's next fsync would make it durable.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fuser::{Errno, FileType};

use super::disk::{self, DirEntry};
use super::pending::Pending;

/// The root directory's inode number, fixed by FUSE.
pub(super) const ROOT: u64 = 1;

/// A disk inode the mount knows.
#[derive(Debug)]
pub(super) struct Inode {
    /// An `O_PATH` descriptor of the disk inode: it reaches the inode after
    /// renames and unlinks, and pins its number so no new file takes it.
    pub(super) fd: OwnedFd,
    pub(super) kind: FileType,
    /// Changes to a regular file's data or size that no fsync has made
    /// durable; `None` when there are none.
    pub(super) pending: Mutex<Option<Pending>>,
}

impl Inode {
    /// The pending changes, locked; a poisoned lock (a panic elsewhere)
    /// still gives them, as they were left.
    pub(super) fn pending(&self) -> MutexGuard<'_, Option<Pending>> {
        self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A file opened through the mount.
#[derive(Debug)]
pub(super) struct OpenFile {
    /// The disk file, opened read-write whatever the client asked for (the
    /// kernel checked its permissions), so any handle can apply a sync.
    pub(super) file: File,
}

#[derive(Debug)]
struct Slot {
    inode: Arc<Inode>,
    /// The disk inode's (device, number).
    key: (u64, u64),
    /// Lookups the kernel has not forgotten yet.
    lookups: u64,
    /// Open files and directories on it.
    handles: u64,
}

#[derive(Debug, Default)]
struct Tables {
    inodes: HashMap<u64, Slot>,
    by_key: HashMap<(u64, u64), u64>,
    next_ino: u64,
    files: HashMap<u64, (u64, Arc<OpenFile>)>,
    dirs: HashMap<u64, (u64, Arc<Vec<DirEntry>>)>,
    next_fh: u64,
}

/// The inode and handle tables, shared by the FUSE threads and `LazyFs`.
#[derive(Debug)]
pub(super) struct InodeTable {
    tables: Mutex<Tables>,
    /// Operations under way that may change pending data.
    busy: AtomicUsize,
}

/// One operation that may change pending data, under way until dropped.
#[derive(Debug)]
pub(super) struct Busy<'a>(&'a AtomicUsize);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How long a power cut waits for operations under way to finish.
const DRAIN: Duration = Duration::from_secs(1);

impl InodeTable {
    /// Tables holding just the root, the disk directory behind `root`.
    pub(super) fn new(root: OwnedFd) -> std::io::Result<Self> {
        let st = disk::stat(root.as_fd())?;
        let key = (st.st_dev, st.st_ino);
        let inode = Arc::new(Inode { fd: root, kind: FileType::Directory, pending: Mutex::new(None) });
        let mut tables = Tables { next_ino: ROOT + 1, next_fh: 1, ..Tables::default() };
        tables.inodes.insert(ROOT, Slot { inode, key, lookups: 1, handles: 0 });
        tables.by_key.insert(key, ROOT);
        Ok(InodeTable { tables: Mutex::new(tables), busy: AtomicUsize::new(0) })
    }

    /// Marks an operation that may change pending data as under way.
    pub(super) fn busy(&self) -> Busy<'_> {
        self.busy.fetch_add(1, Ordering::SeqCst);
        Busy(&self.busy)
    }

    fn lock(&self) -> MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The inode numbered `ino`.
    pub(super) fn get(&self, ino: u64) -> Result<Arc<Inode>, Errno> {
        self.lock().inodes.get(&ino).map(|slot| slot.inode.clone()).ok_or(Errno::ESTALE)
    }

    /// Counts one kernel lookup of the disk inode behind `fd` (whose `fstat`
    /// is `st`), giving it an inode number if it has none yet; `fd` is
    /// dropped if the inode was known already.
    pub(super) fn remember(&self, fd: OwnedFd, st: &libc::stat) -> (u64, Arc<Inode>) {
        let key = (st.st_dev, st.st_ino);
        let mut tables = self.lock();
        if let Some(&ino) = tables.by_key.get(&key) {
            if let Some(slot) = tables.inodes.get_mut(&ino) {
                slot.lookups += 1;
                return (ino, slot.inode.clone());
            }
        }
        let ino = tables.next_ino;
        tables.next_ino += 1;
        let kind = disk::file_type(st.st_mode);
        let inode = Arc::new(Inode { fd, kind, pending: Mutex::new(None) });
        tables.inodes.insert(ino, Slot { inode: inode.clone(), key, lookups: 1, handles: 0 });
        tables.by_key.insert(key, ino);
        (ino, inode)
    }

    /// The kernel forgot `n` lookups of `ino`.
    pub(super) fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        let mut tables = self.lock();
        if let Some(slot) = tables.inodes.get_mut(&ino) {
            slot.lookups = slot.lookups.saturating_sub(n);
        }
        drop_if_unused(&mut tables, ino);
    }

    /// Registers a file opened on `ino`; returns its handle.
    pub(super) fn open_file(&self, ino: u64, file: OpenFile) -> u64 {
        let mut tables = self.lock();
        let fh = next_fh(&mut tables, ino);
        tables.files.insert(fh, (ino, Arc::new(file)));
        fh
    }

    /// The file open as `fh`.
    pub(super) fn file(&self, fh: u64) -> Result<Arc<OpenFile>, Errno> {
        self.lock().files.get(&fh).map(|(_, file)| file.clone()).ok_or(Errno::EBADF)
    }

    /// Closes the file open as `fh`. Its pending changes stay.
    pub(super) fn release_file(&self, fh: u64) {
        let mut tables = self.lock();
        if let Some((ino, _)) = tables.files.remove(&fh) {
            release_handle(&mut tables, ino);
        }
    }

    /// Registers a directory listing opened on `ino`; returns its handle.
    pub(super) fn open_dir(&self, ino: u64, entries: Vec<DirEntry>) -> u64 {
        let mut tables = self.lock();
        let fh = next_fh(&mut tables, ino);
        tables.dirs.insert(fh, (ino, Arc::new(entries)));
        fh
    }

    /// The listing open as `fh`.
    pub(super) fn dir(&self, fh: u64) -> Result<Arc<Vec<DirEntry>>, Errno> {
        self.lock().dirs.get(&fh).map(|(_, entries)| entries.clone()).ok_or(Errno::EBADF)
    }

    pub(super) fn release_dir(&self, fh: u64) {
        let mut tables = self.lock();
        if let Some((ino, _)) = tables.dirs.remove(&fh) {
            release_handle(&mut tables, ino);
        }
    }

    /// Bytes written and not yet made durable, over every inode.
    pub(super) fn pending_bytes(&self) -> u64 {
        let tables = self.lock();
        tables.inodes.values().map(|slot| slot.inode.pending().as_ref().map_or(0, Pending::bytes)).sum()
    }

    /// Throws away every pending change; returns the bytes thrown away.
    pub(super) fn power_cut(&self) -> u64 {
        let start = Instant::now();
        while self.busy.load(Ordering::SeqCst) > 0 && start.elapsed() < DRAIN {
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut tables = self.lock();
        let mut lost = 0;
        for slot in tables.inodes.values() {
            if let Some(pending) = slot.inode.pending().take() {
                lost += pending.bytes();
            }
        }
        let unused: Vec<u64> = tables.inodes.keys().copied().collect();
        for ino in unused {
            drop_if_unused(&mut tables, ino);
        }
        lost
    }
}

fn next_fh(tables: &mut Tables, ino: u64) -> u64 {
    let fh = tables.next_fh;
    tables.next_fh += 1;
    if let Some(slot) = tables.inodes.get_mut(&ino) {
        slot.handles += 1;
    }
    fh
}

fn release_handle(tables: &mut Tables, ino: u64) {
    if let Some(slot) = tables.inodes.get_mut(&ino) {
        slot.handles = slot.handles.saturating_sub(1);
    }
    drop_if_unused(tables, ino);
}

/// Drops `ino` if the kernel forgot it, no handle is open on it, and it has
/// no pending change that a later lookup of its file could still see.
fn drop_if_unused(tables: &mut Tables, ino: u64) {
    let Some(slot) = tables.inodes.get(&ino) else { return };
    if ino == ROOT || slot.lookups > 0 || slot.handles > 0 {
        return;
    }
    if slot.inode.pending().is_some() {
        // Still on disk under some name: keep its changes for that name.
        let linked = disk::stat(slot.inode.fd.as_fd()).is_ok_and(|st| st.st_nlink > 0);
        if linked {
            return;
        }
    }
    let key = slot.key;
    tables.inodes.remove(&ino);
    if tables.by_key.get(&key) == Some(&ino) {
        tables.by_key.remove(&key);
    }
}
