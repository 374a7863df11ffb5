//! The FUSE operations: a passthrough of the disk directory in which file
//! data and sizes go to each inode's [`Pending`] changes until an fsync,
//! and everything else goes straight to the disk directory.
//!
//! Every reply carries a zero TTL and every file is opened with
//! `FOPEN_DIRECT_IO`, so the kernel caches neither data nor attributes nor
//! names: after a power cut it asks again and sees the disk as it is.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use super::disk;
use super::inodes::{Inode, InodeTable, OpenFile, ROOT};
use super::pending::Pending;

/// How long the kernel may trust a name or attributes: not at all.
const TTL: Duration = Duration::ZERO;

type Result<T> = std::result::Result<T, Errno>;

/// The filesystem the FUSE session runs.
#[derive(Debug)]
pub(super) struct Passthrough {
    table: Arc<InodeTable>,
    /// Our own uid and gid: new nodes are given to the caller if it differs.
    uid: u32,
    gid: u32,
}

impl Passthrough {
    pub(super) fn new(table: Arc<InodeTable>) -> Self {
        // SAFETY: getuid and getgid cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        Passthrough { table, uid, gid }
    }

    /// Looks `name` up in `parent` on disk and counts a kernel lookup of it.
    fn entry(&self, parent: &Inode, name: &OsStr) -> Result<FileAttr> {
        let fd = disk::open_at(parent.fd.as_fd(), name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
        let st = disk::stat(fd.as_fd())?;
        let (ino, inode) = self.table.remember(fd, &st);
        let attr = attr(ino, &st, inode.pending().as_ref());
        Ok(attr)
    }

    /// Gives a node the caller just created to the caller, as a kernel
    /// filesystem would (we create everything as ourselves).
    fn give_to_caller(&self, req: &Request, parent: &Inode, name: &OsStr) -> Result<()> {
        if self.uid == 0 && (req.uid() != self.uid || req.gid() != self.gid) {
            disk::chown_at(parent.fd.as_fd(), name, req.uid(), req.gid())?;
        }
        Ok(())
    }

    fn getattr_of(&self, ino: u64) -> Result<FileAttr> {
        let inode = self.table.get(ino)?;
        let st = disk::stat(inode.fd.as_fd())?;
        let attr = attr(ino, &st, inode.pending().as_ref());
        Ok(attr)
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr_of(
        &self,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
    ) -> Result<FileAttr> {
        let _busy = self.table.busy();
        let inode = self.table.get(ino)?;
        let symlink = inode.kind == FileType::Symlink;
        if let Some(mode) = mode {
            if !symlink {
                disk::chmod(inode.fd.as_fd(), mode & 0o7777)?;
            }
        }
        if uid.is_some() || gid.is_some() {
            disk::chown(inode.fd.as_fd(), uid, gid)?;
        }
        if let Some(size) = size {
            if inode.kind != FileType::RegularFile {
                return Err(Errno::EINVAL);
            }
            with_pending(&inode, |pending| pending.set_size(size))?;
        }
        if atime.is_some() || mtime.is_some() {
            disk::set_times(inode.fd.as_fd(), atime, mtime, symlink)?;
        }
        self.getattr_of(ino)
    }

    /// Opens the disk file behind `inode` for a client that asked `flags`.
    fn open_of(&self, ino: u64, flags: i32) -> Result<u64> {
        let _busy = self.table.busy();
        let inode = self.table.get(ino)?;
        if inode.kind != FileType::RegularFile {
            return Err(Errno::EINVAL);
        }
        let fd = match disk::reopen(inode.fd.as_fd(), disk_flags(flags)) {
            Ok(fd) => fd,
            // A read-only disk: the client's own access mode may still do.
            Err(_) => disk::reopen(inode.fd.as_fd(), disk_flags(flags) & !libc::O_ACCMODE | flags & libc::O_ACCMODE)?,
        };
        if flags & libc::O_TRUNC != 0 {
            with_pending(&inode, |pending| pending.set_size(0))?;
        }
        Ok(self.table.open_file(ino, OpenFile { file: File::from(fd) }))
    }

    fn create_of(&self, req: &Request, parent: u64, name: &OsStr, mode: u32, flags: i32) -> Result<(FileAttr, u64)> {
        let _busy = self.table.busy();
        let dir = self.table.get(parent)?;
        let excl = flags & libc::O_EXCL != 0;
        let (fd, created) =
            match disk::open_at(dir.fd.as_fd(), name, disk_flags(flags) | libc::O_CREAT | libc::O_EXCL, mode) {
                Ok(fd) => (fd, true),
                // Someone made it since the kernel looked: open it as it is.
                Err(e) if !excl && e.raw_os_error() == Some(libc::EEXIST) => {
                    (disk::open_at(dir.fd.as_fd(), name, disk_flags(flags), 0)?, false)
                }
                Err(e) => return Err(e.into()),
            };
        if created {
            self.give_to_caller(req, &dir, name)?;
        }
        let st = disk::stat(fd.as_fd())?;
        let path_fd = disk::reopen(fd.as_fd(), libc::O_PATH)?;
        let (ino, inode) = self.table.remember(path_fd, &st);
        if !created && flags & libc::O_TRUNC != 0 {
            with_pending(&inode, |pending| pending.set_size(0))?;
        }
        let attr = attr(ino, &st, inode.pending().as_ref());
        let fh = self.table.open_file(ino, OpenFile { file: File::from(fd) });
        Ok((attr, fh))
    }

    fn read_of(&self, ino: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let open = self.table.file(fh)?;
        let inode = self.table.get(ino)?;
        let pending = inode.pending();
        match pending.as_ref() {
            Some(pending) => Ok(pending.read(offset, size, |at, buf| open.file.read_exact_at(buf, at))?),
            None => Ok(read_disk(&open.file, offset, size)?),
        }
    }

    fn write_of(&self, ino: u64, fh: u64, offset: u64, data: &[u8], sync: bool) -> Result<()> {
        let _busy = self.table.busy();
        let open = self.table.file(fh)?;
        let inode = self.table.get(ino)?;
        let mut pending = inode.pending();
        let changes = match pending.as_mut() {
            Some(changes) => changes,
            None => pending.insert(Pending::new(open.file.metadata()?.len())),
        };
        changes.write(offset, data);
        if sync {
            // O_SYNC / O_DSYNC: each write is durable when it returns.
            changes.apply(&open.file)?;
            open.file.sync_data()?;
            *pending = None;
        }
        Ok(())
    }

    fn fsync_of(&self, ino: u64, fh: u64, datasync: bool) -> Result<()> {
        let _busy = self.table.busy();
        let open = self.table.file(fh)?;
        let inode = self.table.get(ino)?;
        let mut pending = inode.pending();
        if let Some(changes) = pending.as_ref() {
            changes.apply(&open.file)?;
        }
        if datasync {
            open.file.sync_data()?;
        } else {
            open.file.sync_all()?;
        }
        *pending = None;
        Ok(())
    }

    fn fallocate_of(&self, ino: u64, offset: u64, length: u64, mode: i32) -> Result<()> {
        let _busy = self.table.busy();
        let inode = self.table.get(ino)?;
        match mode {
            0 => with_pending(&inode, |pending| {
                if offset + length > pending.size() {
                    pending.set_size(offset + length);
                }
            }),
            // Only reserves space; nothing a client could read changes.
            libc::FALLOC_FL_KEEP_SIZE => Ok(()),
            _ => Err(Errno::EOPNOTSUPP),
        }
    }
}

/// Runs `f` on `inode`'s pending changes, starting them if there are none.
fn with_pending<R>(inode: &Inode, f: impl FnOnce(&mut Pending) -> R) -> Result<R> {
    let mut pending = inode.pending();
    let changes = match pending.as_mut() {
        Some(changes) => changes,
        None => pending.insert(Pending::new(disk::stat(inode.fd.as_fd())?.st_size as u64)),
    };
    Ok(f(changes))
}

/// The flags we open a disk file with for a client that asked `flags`:
/// read-write always; never truncating (a truncate is a pending change),
/// appending (we write at the offsets the kernel gives) or direct.
fn disk_flags(flags: i32) -> i32 {
    let dropped = libc::O_ACCMODE
        | libc::O_CREAT
        | libc::O_EXCL
        | libc::O_TRUNC
        | libc::O_APPEND
        | libc::O_DIRECT
        | libc::O_NOCTTY
        // The kernel resolved the client's name already; the disk file is
        // reopened through its `/proc/self/fd` link, which O_NOFOLLOW
        // would refuse (ELOOP).
        | libc::O_NOFOLLOW;
    flags & !dropped | libc::O_RDWR
}

/// Reads up to `size` bytes at `offset` of a file with nothing pending.
fn read_disk(file: &File, offset: u64, size: u32) -> io::Result<Vec<u8>> {
    let mut buf = vec![0; size as usize];
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(filled);
    Ok(buf)
}

fn time(secs: i64, nanos: i64) -> SystemTime {
    let nanos = Duration::from_nanos(nanos.clamp(0, 999_999_999) as u64);
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64) + nanos
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + nanos
    }
}

/// Attributes of inode `ino` from its disk `st`, with the size clients see.
fn attr(ino: u64, st: &libc::stat, pending: Option<&Pending>) -> FileAttr {
    let (size, blocks) = match pending {
        Some(pending) => (pending.size(), (st.st_blocks as u64).max(pending.size().div_ceil(512))),
        None => (st.st_size as u64, st.st_blocks as u64),
    };
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks,
        atime: time(st.st_atime, st.st_atime_nsec),
        mtime: time(st.st_mtime, st.st_mtime_nsec),
        ctime: time(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: disk::file_type(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

fn empty(reply: ReplyEmpty, result: Result<()>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

fn entry(reply: ReplyEntry, result: Result<FileAttr>) {
    match result {
        Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
        Err(e) => reply.error(e),
    }
}

fn attr_reply(reply: ReplyAttr, result: Result<FileAttr>) {
    match result {
        Ok(attr) => reply.attr(&TTL, &attr),
        Err(e) => reply.error(e),
    }
}

impl Filesystem for Passthrough {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        entry(reply, self.table.get(parent.0).and_then(|dir| self.entry(&dir, name)));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.table.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        attr_reply(reply, self.getattr_of(ino.0));
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        attr_reply(reply, self.setattr_of(ino.0, mode, uid, gid, size, atime, mtime));
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.table.get(ino.0).and_then(|inode| Ok(disk::read_link(inode.fd.as_fd())?)) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let result = self.table.get(parent.0).and_then(|dir| {
            disk::mknod_at(dir.fd.as_fd(), name, mode, rdev)?;
            self.give_to_caller(req, &dir, name)?;
            self.entry(&dir, name)
        });
        entry(reply, result);
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        let result = self.table.get(parent.0).and_then(|dir| {
            disk::mkdir_at(dir.fd.as_fd(), name, mode)?;
            self.give_to_caller(req, &dir, name)?;
            self.entry(&dir, name)
        });
        entry(reply, result);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let result = self.table.get(parent.0).and_then(|dir| Ok(disk::unlink_at(dir.fd.as_fd(), name, 0)?));
        empty(reply, result);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let result =
            self.table.get(parent.0).and_then(|dir| Ok(disk::unlink_at(dir.fd.as_fd(), name, libc::AT_REMOVEDIR)?));
        empty(reply, result);
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let result = self.table.get(parent.0).and_then(|dir| {
            disk::symlink_at(target, dir.fd.as_fd(), link_name)?;
            self.give_to_caller(req, &dir, link_name)?;
            self.entry(&dir, link_name)
        });
        entry(reply, result);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let result = self.table.get(parent.0).and_then(|dir| {
            let new_dir = self.table.get(newparent.0)?;
            Ok(disk::rename_at(dir.fd.as_fd(), name, new_dir.fd.as_fd(), newname, flags.bits())?)
        });
        empty(reply, result);
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let result = self.table.get(ino.0).and_then(|inode| {
            let new_dir = self.table.get(newparent.0)?;
            disk::link_at(inode.fd.as_fd(), new_dir.fd.as_fd(), newname)?;
            self.entry(&new_dir, newname)
        });
        entry(reply, result);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.open_of(ino.0, flags.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.read_of(ino.0, fh.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let sync = flags.0 & libc::O_DSYNC != 0;
        match self.write_of(ino.0, fh.0, offset, data, sync) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    /// A close: makes nothing durable.
    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    /// The last close: makes nothing durable either.
    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.table.release_file(fh.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        empty(reply, self.fsync_of(ino.0, fh.0, datasync));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let result = self.table.get(ino.0).and_then(|inode| Ok(disk::read_dir(inode.fd.as_fd())?));
        match result {
            Ok(entries) => reply.opened(FileHandle(self.table.open_dir(ino.0, entries)), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let entries = match self.table.dir(fh.0) {
            Ok(entries) => entries,
            Err(e) => return reply.error(e),
        };
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(e.ino), i as u64 + 1, e.kind, &e.name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.table.release_dir(fh.0);
        reply.ok();
    }

    /// Names are never volatile here (they go to disk at once), so there is
    /// nothing to make durable.
    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.table.get(ROOT).and_then(|root| Ok(disk::statfs(root.fd.as_fd())?)) {
            Ok(st) => reply.statfs(
                st.f_blocks,
                st.f_bfree,
                st.f_bavail,
                st.f_files,
                st.f_ffree,
                st.f_bsize as u32,
                st.f_namemax as u32,
                st.f_frsize as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let result = self.table.get(ino.0).and_then(|inode| Ok(disk::access(inode.fd.as_fd(), mask.bits())?));
        empty(reply, result);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self.create_of(req, parent.0, name, mode, flags) {
            Ok((attr, fh)) => reply.created(&TTL, &attr, Generation(0), FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.fallocate_of(ino.0, offset, length, mode));
    }
}
