//! The disk directory under the mount, reached through file descriptors
//! rather than paths, as libfuse's `passthrough_ll` does: every inode the
//! kernel knows holds an `O_PATH` descriptor of its disk inode, and each
//! call here is the `*at` form (or `/proc/self/fd/N`) on such a descriptor.
//! So a rename or unlink on the mount never leaves us holding a stale path,
//! and a disk inode number cannot be reused while we still know its inode.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirEntryExt;
use std::path::Path;
use std::time::UNIX_EPOCH;

use fuser::{FileType, TimeOrNow};

/// A name in a directory, as `readdir` lists it.
#[derive(Debug)]
pub(super) struct DirEntry {
    /// The disk inode number; the kernel shows it as `d_ino` only.
    pub(super) ino: u64,
    pub(super) kind: FileType,
    pub(super) name: OsString,
}

fn c_string(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `/proc/self/fd/N`: opening it (or calling a path-taking function on it)
/// reaches the inode behind descriptor N, even one unlinked since.
fn proc_path(fd: BorrowedFd<'_>) -> io::Result<CString> {
    c_string(format!("/proc/self/fd/{}", fd.as_raw_fd()).as_bytes())
}

/// Opens `path` (the disk directory itself) as an `O_PATH` descriptor.
pub(super) fn open_root(path: &Path) -> io::Result<OwnedFd> {
    let path = c_string(path.as_os_str().as_bytes())?;
    // SAFETY: `path` is a NUL-terminated string that outlives the call.
    let fd = check(unsafe { libc::open(path.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) })?;
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `openat(dir, name, flags, mode)`, close-on-exec.
pub(super) fn open_at(dir: BorrowedFd<'_>, name: &OsStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let name = c_string(name.as_bytes())?;
    // SAFETY: `name` is NUL-terminated and outlives the call; `dir` is open.
    let fd = check(unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags | libc::O_CLOEXEC, mode) })?;
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens the inode behind `fd` again, with `flags`.
pub(super) fn reopen(fd: BorrowedFd<'_>, flags: i32) -> io::Result<OwnedFd> {
    let path = proc_path(fd)?;
    // SAFETY: `path` is NUL-terminated and outlives the call.
    let fd = check(unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) })?;
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fstat`, which works on `O_PATH` descriptors too.
pub(super) fn stat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    // SAFETY: `stat` is plain data, for which all zeros is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable `stat`; `fd` is open.
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

pub(super) fn mkdir_at(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> io::Result<()> {
    let name = c_string(name.as_bytes())?;
    // SAFETY: `name` is NUL-terminated and outlives the call.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) }).map(drop)
}

pub(super) fn mknod_at(dir: BorrowedFd<'_>, name: &OsStr, mode: u32, rdev: u32) -> io::Result<()> {
    let name = c_string(name.as_bytes())?;
    // SAFETY: `name` is NUL-terminated and outlives the call.
    check(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, libc::dev_t::from(rdev)) }).map(drop)
}

pub(super) fn symlink_at(target: &Path, dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let target = c_string(target.as_os_str().as_bytes())?;
    let name = c_string(name.as_bytes())?;
    // SAFETY: both strings are NUL-terminated and outlive the call.
    check(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

/// `unlinkat`; `flags` is 0 or `AT_REMOVEDIR`.
pub(super) fn unlink_at(dir: BorrowedFd<'_>, name: &OsStr, flags: i32) -> io::Result<()> {
    let name = c_string(name.as_bytes())?;
    // SAFETY: `name` is NUL-terminated and outlives the call.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
}

/// `renameat2`, flags (`RENAME_NOREPLACE`, `RENAME_EXCHANGE`) passed on.
pub(super) fn rename_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    new_dir: BorrowedFd<'_>,
    new_name: &OsStr,
    flags: u32,
) -> io::Result<()> {
    let name = c_string(name.as_bytes())?;
    let new_name = c_string(new_name.as_bytes())?;
    // SAFETY: both strings are NUL-terminated and outlive the call.
    check(unsafe { libc::renameat2(dir.as_raw_fd(), name.as_ptr(), new_dir.as_raw_fd(), new_name.as_ptr(), flags) })
        .map(drop)
}

/// A new hard link `new_dir/new_name` to the inode behind `fd`.
pub(super) fn link_at(fd: BorrowedFd<'_>, new_dir: BorrowedFd<'_>, new_name: &OsStr) -> io::Result<()> {
    let path = proc_path(fd)?;
    let new_name = c_string(new_name.as_bytes())?;
    // SAFETY: both strings are NUL-terminated and outlive the call.
    check(unsafe {
        libc::linkat(libc::AT_FDCWD, path.as_ptr(), new_dir.as_raw_fd(), new_name.as_ptr(), libc::AT_SYMLINK_FOLLOW)
    })
    .map(drop)
}

/// The target of the symlink behind `fd`.
pub(super) fn read_link(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: the empty path is NUL-terminated; `buf` is writable for its length.
    let len = unsafe { libc::readlinkat(fd.as_raw_fd(), c"".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if len < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(len as usize);
    Ok(buf)
}

pub(super) fn chmod(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    let path = proc_path(fd)?;
    // SAFETY: `path` is NUL-terminated and outlives the call.
    check(unsafe { libc::fchmodat(libc::AT_FDCWD, path.as_ptr(), mode, 0) }).map(drop)
}

/// `fchownat` on the inode behind `fd`; `None` leaves that id as it is.
pub(super) fn chown(fd: BorrowedFd<'_>, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    // SAFETY: the empty path is NUL-terminated; `AT_EMPTY_PATH` makes it name `fd`.
    check(unsafe {
        libc::fchownat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            uid.unwrap_or(u32::MAX),
            gid.unwrap_or(u32::MAX),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// `fchownat` on `dir/name`, not following a symlink.
pub(super) fn chown_at(dir: BorrowedFd<'_>, name: &OsStr, uid: u32, gid: u32) -> io::Result<()> {
    let name = c_string(name.as_bytes())?;
    // SAFETY: `name` is NUL-terminated and outlives the call.
    check(unsafe { libc::fchownat(dir.as_raw_fd(), name.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) }).map(drop)
}

fn timespec(time: Option<TimeOrNow>) -> libc::timespec {
    let (tv_sec, tv_nsec) = match time {
        None => (0, libc::UTIME_OMIT),
        Some(TimeOrNow::Now) => (0, libc::UTIME_NOW),
        Some(TimeOrNow::SpecificTime(at)) => match at.duration_since(UNIX_EPOCH) {
            Ok(after) => (after.as_secs() as i64, i64::from(after.subsec_nanos())),
            Err(before) => {
                let before = before.duration();
                let nanos = i64::from(before.subsec_nanos());
                if nanos == 0 {
                    (-(before.as_secs() as i64), 0)
                } else {
                    (-(before.as_secs() as i64) - 1, 1_000_000_000 - nanos)
                }
            }
        },
    };
    libc::timespec { tv_sec, tv_nsec }
}

/// Sets access and modification times on the inode behind `fd` (a symlink
/// itself if `symlink`).
pub(super) fn set_times(
    fd: BorrowedFd<'_>,
    atime: Option<TimeOrNow>,
    mtime: Option<TimeOrNow>,
    symlink: bool,
) -> io::Result<()> {
    let times = [timespec(atime), timespec(mtime)];
    if symlink {
        // SAFETY: the empty path is NUL-terminated; `times` holds two timespecs.
        return check(unsafe { libc::utimensat(fd.as_raw_fd(), c"".as_ptr(), times.as_ptr(), libc::AT_EMPTY_PATH) })
            .map(drop);
    }
    let path = proc_path(fd)?;
    // SAFETY: `path` is NUL-terminated and outlives the call; `times` holds two timespecs.
    check(unsafe { libc::utimensat(libc::AT_FDCWD, path.as_ptr(), times.as_ptr(), 0) }).map(drop)
}

pub(super) fn statfs(fd: BorrowedFd<'_>) -> io::Result<libc::statvfs> {
    // SAFETY: `statvfs` is plain data, for which all zeros is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable `statvfs`; `fd` is open.
    check(unsafe { libc::fstatvfs(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

/// `access(2)` on the inode behind `fd`.
pub(super) fn access(fd: BorrowedFd<'_>, mask: i32) -> io::Result<()> {
    let path = proc_path(fd)?;
    // SAFETY: `path` is NUL-terminated and outlives the call.
    check(unsafe { libc::faccessat(libc::AT_FDCWD, path.as_ptr(), mask, 0) }).map(drop)
}

/// The type bits of a `st_mode`, as FUSE names them.
pub(super) fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

/// Every name in the directory behind `fd`, `.` and `..` first.
pub(super) fn read_dir(fd: BorrowedFd<'_>) -> io::Result<Vec<DirEntry>> {
    let st = stat(fd)?;
    let mut entries = vec![
        DirEntry { ino: st.st_ino, kind: FileType::Directory, name: ".".into() },
        DirEntry { ino: st.st_ino, kind: FileType::Directory, name: "..".into() },
    ];
    let path = proc_path(fd)?;
    for entry in std::fs::read_dir(OsStr::from_bytes(path.as_bytes()))? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let kind = FileType::from_std(kind).unwrap_or(FileType::RegularFile);
        entries.push(DirEntry { ino: entry.ino(), kind, name: entry.file_name() });
    }
    Ok(entries)
}
