//! The allowed roots: a worker reads (as a source) and writes (as a target)
//! only below them. Paths must be absolute with no `.` or `..` parts; the
//! deepest existing ancestor is resolved (symlinks included) and must lie in
//! a root, so a symlink cannot lead a write outside.

use std::path::{Component, Path, PathBuf};

/// The canonical allowed roots of one worker.
#[derive(Debug, Clone)]
pub struct Roots {
    roots: Vec<PathBuf>,
}

fn plain_absolute(path: &str) -> Result<PathBuf, String> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(format!("{path} is not an absolute path"));
    }
    if p.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir)) {
        return Err(format!("{path} contains . or .."));
    }
    Ok(p.to_path_buf())
}

impl Roots {
    /// Creates missing roots and resolves them.
    pub fn new(roots: &[PathBuf]) -> std::io::Result<Self> {
        let mut out = Vec::new();
        for r in roots {
            std::fs::create_dir_all(r)?;
            out.push(r.canonicalize()?);
        }
        Ok(Self { roots: out })
    }

    /// The roots, resolved.
    pub fn list(&self) -> &[PathBuf] {
        &self.roots
    }

    fn inside(&self, resolved: &Path) -> bool {
        self.roots.iter().any(|r| resolved.starts_with(r))
    }

    /// An existing file to read: resolved completely and inside a root.
    pub fn check_read(&self, path: &str) -> Result<PathBuf, String> {
        let p = plain_absolute(path)?;
        let resolved = p.canonicalize().map_err(|e| format!("{path}: {e}"))?;
        if !self.inside(&resolved) {
            return Err(format!("{path} is outside the allowed roots"));
        }
        if !resolved.is_file() {
            return Err(format!("{path} is not a regular file"));
        }
        Ok(resolved)
    }

    /// A file to create or replace: its deepest existing ancestor resolves
    /// inside a root, and the path itself is not a symlink.
    pub fn check_write(&self, path: &str) -> Result<PathBuf, String> {
        let p = plain_absolute(path)?;
        if p.symlink_metadata().map(|m| m.file_type().is_symlink()).unwrap_or(false) {
            return Err(format!("{path} is a symlink"));
        }
        let mut existing = p.parent().ok_or_else(|| format!("{path} has no parent directory"))?;
        let mut rest = Vec::new();
        rest.push(p.file_name().ok_or_else(|| format!("{path} has no file name"))?.to_owned());
        while !existing.exists() {
            rest.push(existing.file_name().ok_or_else(|| format!("{path} has no existing ancestor"))?.to_owned());
            existing = existing.parent().ok_or_else(|| format!("{path} has no existing ancestor"))?;
        }
        let mut resolved = existing.canonicalize().map_err(|e| format!("{path}: {e}"))?;
        // Roots exist, so for a path inside one the deepest existing
        // ancestor is that root or below it.
        if !self.inside(&resolved) {
            return Err(format!("{path} is outside the allowed roots"));
        }
        for part in rest.into_iter().rev() {
            resolved.push(part);
        }
        if !self.inside(&resolved) || self.roots.contains(&resolved) {
            return Err(format!("{path} is outside the allowed roots"));
        }
        Ok(resolved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_stay_inside_roots_even_through_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        let roots = Roots::new(std::slice::from_ref(&root)).unwrap();
        let r = roots.list()[0].clone();
        let ok = format!("{}/a/b/file.bin", r.display());
        assert_eq!(roots.check_write(&ok).unwrap(), r.join("a/b/file.bin"));
        assert!(roots.check_write(&format!("{}/../outside/x", r.display())).is_err());
        assert!(roots.check_write("relative/x").is_err());
        assert!(roots.check_write(&format!("{}/x", outside.display())).is_err());
        std::os::unix::fs::symlink(&outside, r.join("escape")).unwrap();
        let err = roots.check_write(&format!("{}/escape/x", r.display())).unwrap_err();
        assert!(err.contains("outside"), "{err}");
        std::fs::write(outside.join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), r.join("link")).unwrap();
        assert!(roots.check_write(&format!("{}/link", r.display())).is_err());
        assert!(roots.check_read(&format!("{}/link", r.display())).is_err(), "reads resolve symlinks too");
        assert!(roots.check_write(&r.display().to_string()).is_err(), "the root itself is not a file");
    }
}
