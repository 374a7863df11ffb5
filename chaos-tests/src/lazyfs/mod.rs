//! A power-loss filesystem, after LazyFS (which etcd's robustness tests
//! use): a FUSE passthrough of a disk directory that keeps every file write
//! no fsync has made durable in memory, and throws it away on a "power
//! cut". A scheduler whose data directory is on it, killed with SIGKILL and
//! then power-cut, restarts on exactly what it had made durable — so a
//! check after the restart proves that what it acknowledged was on disk.
//!
//! What is volatile and what is not:
//! - File data writes and size changes (`write`, `truncate`/`ftruncate`,
//!   `O_TRUNC`, `fallocate` that grows a file) are kept in memory per inode,
//!   over the disk file as it was at the last sync; reads and `stat` see
//!   them. An `fsync` or `fdatasync` of the file, through any handle, writes
//!   that inode's pending data and size to the disk file and fsyncs it; so
//!   does every write through a handle opened `O_SYNC` or `O_DSYNC`.
//!   `close` (FUSE `flush` and `release`) makes nothing durable.
//! - Names and metadata (create, mknod, mkdir, unlink, rmdir, rename with
//!   its flags, link, symlink, chmod, chown, utimes) go to the disk
//!   directory at once and survive a power cut, as in LazyFS: a file
//!   created and never synced comes back empty, not missing.
//! - Pending changes belong to the inode, not the name: a file renamed
//!   before its data was synced keeps the new name and loses the data at a
//!   power cut (the classic "rename without fsync" loss). A file unlinked
//!   while open stays readable and writable through its handles.
//!
//! The kernel caches nothing across a cut: files are opened with direct
//! I/O and every name and attribute is given a zero TTL. `mmap` of files is
//! not supported (direct I/O), nor are extended attributes, `copy_file_range`
//! (the kernel falls back to read and write) or `fallocate` modes other than
//! growing or `FALLOC_FL_KEEP_SIZE`. POSIX and `flock` locks are the
//! kernel's own. Modification times on disk are not moved by pending writes.
//! `sync_file_range` never reaches a FUSE filesystem, so it makes nothing
//! durable here — nor, against power loss, on a disk (it flushes neither
//! metadata nor the drive's cache). sled 0.34 relies on it for its log
//! writes; only its `sync_all`s (snapshots, periodic flush) count here.
//!
//! Layout: `pending` holds one file's pending changes, `inodes` the inode
//! and handle tables, `passthrough` the FUSE operations, and `disk` the
//! calls on the disk directory.

mod disk;
mod inodes;
mod passthrough;
mod pending;
#[cfg(test)]
mod tests;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use fuser::{BackgroundSession, Config, MountOption, SessionACL};

use inodes::InodeTable;
use passthrough::Passthrough;

/// Threads serving the mount: enough that one client's fsync does not hold
/// up another's reads and writes.
const THREADS: usize = 4;

/// A passthrough of `disk` mounted at `mountpoint`, holding every write not
/// yet made durable in memory until a [`power_cut`](LazyFs::power_cut)
/// throws it away. Dropping it unmounts (lazily if the mount is busy),
/// and what was still pending is lost as in a power cut.
#[derive(Debug)]
pub struct LazyFs {
    mountpoint: PathBuf,
    table: Arc<InodeTable>,
    session: Option<BackgroundSession>,
}

impl LazyFs {
    /// Mounts a passthrough of the directory `disk` at the directory
    /// `mountpoint` (both must exist), served by background threads.
    /// Needs root and `/dev/fuse`; see [`LazyFs::unsupported`].
    pub fn mount(disk: &Path, mountpoint: &Path) -> anyhow::Result<Self> {
        if let Some(why) = Self::unsupported() {
            bail!("cannot mount a lazy filesystem here: {why}");
        }
        let disk = disk.canonicalize().with_context(|| format!("opening disk directory {}", disk.display()))?;
        let mountpoint =
            mountpoint.canonicalize().with_context(|| format!("opening mountpoint {}", mountpoint.display()))?;
        if mountpoint.starts_with(&disk) {
            bail!("mountpoint {} is inside the disk directory {}", mountpoint.display(), disk.display());
        }
        let root = disk::open_root(&disk).with_context(|| format!("opening disk directory {}", disk.display()))?;
        let table = Arc::new(InodeTable::new(root).context("reading the disk directory")?);

        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("ferry-lazyfs".into()),
            MountOption::Subtype("lazyfs".into()),
            MountOption::DefaultPermissions,
            MountOption::RW,
        ];
        config.acl = SessionACL::RootAndOwner;
        config.n_threads = Some(THREADS);
        config.clone_fd = true;
        let session = fuser::spawn_mount(Passthrough::new(table.clone()), &mountpoint, &config)
            .with_context(|| format!("mounting {} on {}", disk.display(), mountpoint.display()))?;
        Ok(LazyFs { mountpoint, table, session: Some(session) })
    }

    /// Why this process cannot mount one, if it cannot: it must be root
    /// and have `/dev/fuse`.
    pub fn unsupported() -> Option<String> {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Some("not running as root".into());
        }
        if !Path::new("/dev/fuse").exists() {
            return Some("no /dev/fuse".into());
        }
        None
    }

    /// Where it is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Throws away every write not yet made durable, as a power cut would;
    /// the disk directory is left as the last syncs made it. The processes
    /// using the mount must be dead (killed and reaped) first: a live one
    /// would see its files change under it. Operations a killed process
    /// left under way are waited for (up to a second) so that they land
    /// before the cut. Returns the bytes thrown away.
    pub fn power_cut(&self) -> u64 {
        self.table.power_cut()
    }

    /// Bytes written and not yet made durable.
    pub fn pending(&self) -> u64 {
        self.table.pending_bytes()
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        let Some(session) = self.session.take() else { return };
        if session.umount_and_join().is_ok() {
            return;
        }
        // Busy: detach it now; the kernel ends it when its last user goes,
        // and the (detached) serving threads with it.
        if let Ok(path) = CString::new(self.mountpoint.as_os_str().as_bytes()) {
            // SAFETY: `path` is NUL-terminated and outlives the call.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
    }
}
