//! The mount as programs see it, through real `std::fs` calls: what a read
//! shows before a sync, and what a power cut keeps.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use tempfile::TempDir;

use super::LazyFs;

/// A disk directory and a lazy mount of it, in a temp dir; `None` (after
/// saying why) where this machine cannot mount one.
struct Mounted {
    fs: LazyFs,
    disk: PathBuf,
    // Dropped last: the mount goes before its directories.
    _dir: TempDir,
}

impl Mounted {
    fn new() -> Option<Self> {
        if let Some(why) = LazyFs::unsupported() {
            eprintln!("skipping: {why}");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk");
        let mnt = dir.path().join("mnt");
        fs::create_dir(&disk).unwrap();
        fs::create_dir(&mnt).unwrap();
        let fs = LazyFs::mount(&disk, &mnt).unwrap();
        Some(Mounted { fs, disk, _dir: dir })
    }

    /// `name` on the mount.
    fn path(&self, name: &str) -> PathBuf {
        self.fs.mountpoint().join(name)
    }
}

fn read_write(path: &Path) -> File {
    OpenOptions::new().read(true).write(true).open(path).unwrap()
}

#[test]
fn lazyfs_write_is_visible_before_fsync_and_only_in_memory() {
    let Some(m) = Mounted::new() else { return };
    fs::write(m.path("a"), b"hello").unwrap();
    assert_eq!(fs::read(m.path("a")).unwrap(), b"hello");
    assert_eq!(fs::metadata(m.path("a")).unwrap().len(), 5);
    assert_eq!(m.fs.pending(), 5);
    // The name is on disk at once, the data is not.
    assert_eq!(fs::read(m.disk.join("a")).unwrap(), b"");
}

#[test]
fn lazyfs_power_cut_drops_unsynced_writes_and_keeps_synced_ones() {
    let Some(m) = Mounted::new() else { return };
    let mut synced = File::create(m.path("synced")).unwrap();
    synced.write_all(b"durable").unwrap();
    synced.sync_all().unwrap();
    synced.write_all(b" and not").unwrap();
    drop(synced);
    fs::write(m.path("unsynced"), b"lost").unwrap();
    let mut data = File::create(m.path("datasynced")).unwrap();
    data.write_all(b"by fdatasync").unwrap();
    data.sync_data().unwrap();
    drop(data);

    assert_eq!(m.fs.pending(), 8 + 4);
    assert_eq!(m.fs.power_cut(), 8 + 4);
    assert_eq!(m.fs.pending(), 0);
    assert_eq!(fs::read(m.path("synced")).unwrap(), b"durable");
    assert_eq!(fs::read(m.path("unsynced")).unwrap(), b"");
    assert_eq!(fs::read(m.path("datasynced")).unwrap(), b"by fdatasync");
    assert_eq!(fs::read(m.disk.join("synced")).unwrap(), b"durable");
}

#[test]
fn lazyfs_extended_then_fsynced_file_keeps_exactly_the_synced_length() {
    let Some(m) = Mounted::new() else { return };
    let file = File::create(m.path("f")).unwrap();
    file.write_all_at(&[7; 100], 0).unwrap();
    file.set_len(4096).unwrap();
    file.sync_all().unwrap();
    file.write_all_at(&[9; 100], 4096).unwrap();
    file.set_len(10_000).unwrap();
    assert_eq!(fs::metadata(m.path("f")).unwrap().len(), 10_000);

    m.fs.power_cut();
    let after = fs::read(m.path("f")).unwrap();
    assert_eq!(after.len(), 4096);
    assert_eq!(&after[..100], &[7; 100]);
    assert!(after[100..].iter().all(|&b| b == 0));
}

#[test]
fn lazyfs_rename_without_fsync_keeps_the_name_and_loses_the_data() {
    let Some(m) = Mounted::new() else { return };
    fs::write(m.path("state"), b"old state").unwrap();
    File::open(m.path("state")).unwrap().sync_all().unwrap();
    // The write-temp-then-rename pattern, missing its fsync.
    fs::write(m.path("state.tmp"), b"new state").unwrap();
    fs::rename(m.path("state.tmp"), m.path("state")).unwrap();
    assert_eq!(fs::read(m.path("state")).unwrap(), b"new state");

    assert_eq!(m.fs.power_cut(), 9);
    assert_eq!(fs::read(m.path("state")).unwrap(), b"");
    assert!(!m.path("state.tmp").exists());
}

#[test]
fn lazyfs_fsync_through_one_handle_covers_writes_through_another() {
    let Some(m) = Mounted::new() else { return };
    let writer = File::create(m.path("f")).unwrap();
    let syncer = File::open(m.path("f")).unwrap();
    writer.write_all_at(b"written by one", 0).unwrap();
    // fsync on a read-only handle still syncs the file.
    syncer.sync_all().unwrap();
    writer.write_all_at(b"!", 14).unwrap();

    assert_eq!(m.fs.power_cut(), 1);
    assert_eq!(fs::read(m.path("f")).unwrap(), b"written by one");
}

#[test]
fn lazyfs_truncate_is_volatile_until_synced() {
    let Some(m) = Mounted::new() else { return };
    fs::write(m.path("f"), b"0123456789").unwrap();
    File::open(m.path("f")).unwrap().sync_all().unwrap();

    read_write(&m.path("f")).set_len(3).unwrap();
    assert_eq!(fs::read(m.path("f")).unwrap(), b"012");
    m.fs.power_cut();
    assert_eq!(fs::read(m.path("f")).unwrap(), b"0123456789");

    // O_TRUNC is a truncate too; synced, it stays.
    let mut file = File::create(m.path("f")).unwrap();
    file.write_all(b"ab").unwrap();
    assert_eq!(fs::read(m.path("f")).unwrap(), b"ab");
    file.sync_data().unwrap();
    m.fs.power_cut();
    assert_eq!(fs::read(m.path("f")).unwrap(), b"ab");
}

#[test]
fn lazyfs_unlinked_open_file_still_works() {
    let Some(m) = Mounted::new() else { return };
    let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(m.path("f")).unwrap();
    file.write_all(b"before").unwrap();
    fs::remove_file(m.path("f")).unwrap();
    assert!(!m.path("f").exists());
    file.write_all(b" after").unwrap();
    file.sync_all().unwrap();
    let mut back = String::new();
    file.seek(SeekFrom::Start(0)).unwrap();
    file.read_to_string(&mut back).unwrap();
    assert_eq!(back, "before after");
    assert_eq!(file.metadata().unwrap().len(), 12);
    // A new file under the old name is another file.
    fs::write(m.path("f"), b"new").unwrap();
    assert_eq!(fs::read(m.path("f")).unwrap(), b"new");
    assert_eq!(file.read_at(&mut [0; 6], 0).unwrap(), 6);
}

#[test]
fn lazyfs_opens_with_nofollow_as_a_disk_does() {
    let Some(m) = Mounted::new() else { return };
    let nofollow = |create: bool| {
        OpenOptions::new().read(true).write(true).create(create).custom_flags(libc::O_NOFOLLOW).open(m.path("f"))
    };
    nofollow(true).unwrap().write_all(b"x").unwrap();
    nofollow(false).unwrap();
    std::os::unix::fs::symlink("f", m.path("link")).unwrap();
    let err = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(m.path("link")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ELOOP), "a symlink is still refused");
}

#[test]
fn lazyfs_append_and_exclusive_create_behave() {
    let Some(m) = Mounted::new() else { return };
    fs::write(m.path("log"), b"one").unwrap();
    let mut log = OpenOptions::new().append(true).open(m.path("log")).unwrap();
    log.write_all(b" two").unwrap();
    log.write_all(b" three").unwrap();
    assert_eq!(fs::read(m.path("log")).unwrap(), b"one two three");

    OpenOptions::new().write(true).create_new(true).open(m.path("lock")).unwrap();
    let again = OpenOptions::new().write(true).create_new(true).open(m.path("lock"));
    assert_eq!(again.unwrap_err().kind(), ErrorKind::AlreadyExists);

    // An O_DSYNC handle's writes are durable when they return.
    let mut dsync = OpenOptions::new().write(true).create(true).custom_flags(libc::O_DSYNC).open(m.path("d")).unwrap();
    dsync.write_all(b"at once").unwrap();
    assert_eq!(m.fs.power_cut(), 3 + 10);
    assert_eq!(fs::read(m.path("d")).unwrap(), b"at once");
}

#[test]
fn lazyfs_rename_flags_pass_through_and_pending_data_follows_the_inode() {
    let Some(m) = Mounted::new() else { return };
    fs::write(m.path("a"), b"synced a").unwrap();
    File::open(m.path("a")).unwrap().sync_all().unwrap();
    fs::write(m.path("b"), b"pending b").unwrap();
    let rename = |from: &str, to: &str, flags: u32| {
        let from = std::ffi::CString::new(m.path(from).into_os_string().into_encoded_bytes()).unwrap();
        let to = std::ffi::CString::new(m.path(to).into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: both paths are NUL-terminated and outlive the call.
        let ret = unsafe { libc::renameat2(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), flags) };
        if ret == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    let refused = rename("a", "b", libc::RENAME_NOREPLACE).unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::AlreadyExists);
    rename("a", "b", libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(fs::read(m.path("a")).unwrap(), b"pending b");
    assert_eq!(fs::read(m.path("b")).unwrap(), b"synced a");

    m.fs.power_cut();
    assert_eq!(fs::read(m.path("a")).unwrap(), b"");
    assert_eq!(fs::read(m.path("b")).unwrap(), b"synced a");
}

#[test]
fn lazyfs_directories_and_names_pass_through() {
    let Some(m) = Mounted::new() else { return };
    fs::create_dir_all(m.path("a/b")).unwrap();
    fs::write(m.path("a/b/f"), b"x").unwrap();
    std::os::unix::fs::symlink("b/f", m.path("a/link")).unwrap();
    fs::hard_link(m.path("a/b/f"), m.path("a/hard")).unwrap();
    assert_eq!(fs::read_link(m.path("a/link")).unwrap(), Path::new("b/f"));
    assert_eq!(fs::read(m.path("a/link")).unwrap(), b"x");
    // Two names, one inode: one set of pending changes.
    assert_eq!(fs::read(m.path("a/hard")).unwrap(), b"x");
    assert_eq!(m.fs.pending(), 1);
    fs::rename(m.path("a/b"), m.path("c")).unwrap();
    assert_eq!(fs::read(m.path("c/f")).unwrap(), b"x");

    let mut names: Vec<_> = fs::read_dir(m.path("a")).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, ["hard", "link"]);
    assert!(m.disk.join("c/f").exists());
    fs::remove_file(m.path("a/link")).unwrap();
    fs::remove_file(m.path("a/hard")).unwrap();
    fs::remove_dir(m.path("a")).unwrap();
    assert!(!m.disk.join("a").exists());
}

#[test]
fn lazyfs_serves_concurrent_writers_and_syncers() {
    let Some(m) = Mounted::new() else { return };
    std::thread::scope(|s| {
        for t in 0..8 {
            let path = m.path(&format!("f{t}"));
            s.spawn(move || {
                let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
                for i in 0..200u64 {
                    file.write_all_at(&i.to_le_bytes(), i * 8).unwrap();
                    if i % 50 == 49 {
                        file.sync_data().unwrap();
                    }
                    let mut back = [0; 8];
                    file.read_exact_at(&mut back, i * 8).unwrap();
                    assert_eq!(u64::from_le_bytes(back), i);
                }
            });
        }
    });
    // Everything was synced at record 199.
    assert_eq!(m.fs.power_cut(), 0);
    for t in 0..8 {
        assert_eq!(fs::metadata(m.path(&format!("f{t}"))).unwrap().len(), 1600);
    }
}
