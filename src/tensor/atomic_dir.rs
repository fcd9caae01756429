//! Replacing a whole directory atomically: readers see the old directory or the new one,
//! never a mix, and a crash leaves at most a temporary sibling (`.NAME.tmp-PID-N`) behind.

use std::path::{Path, PathBuf};

use super::writer::{sync_dir, temp_sibling};
use crate::error::{Error, Result};

/// Removes a temporary directory unless disarmed.
struct TempDir(Option<PathBuf>);

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// `fill` writes the files into a fresh temporary directory beside `target`; the directory
/// is then synced and renamed into place (an earlier `target` moves aside first and is removed
/// last). On any error the temporary directory is removed and `target` is left as it was.
pub fn replace_dir_atomically<T>(
    target: &Path,
    fill: impl FnOnce(&Path) -> Result<T>,
) -> Result<T> {
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let tmp = temp_sibling(target);
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut guard = TempDir(Some(tmp.clone()));
    let filled = fill(&tmp)?;
    sync_dir(&tmp)?;

    let old = target.exists().then(|| temp_sibling(target));
    if let Some(old) = &old {
        std::fs::rename(target, old).map_err(|e| Error::io(target, e))?;
    }
    if let Err(e) = std::fs::rename(&tmp, target) {
        if let Some(old) = &old {
            let _ = std::fs::rename(old, target);
        }
        return Err(Error::io(target, e));
    }
    guard.0 = None;
    if let Some(old) = old {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    sync_dir(&parent)?;
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_or_not_at_all() {
        let work = tempfile::tempdir().unwrap();
        let target = work.path().join("out");
        replace_dir_atomically(&target, |tmp| {
            std::fs::write(tmp.join("a"), b"1").map_err(|e| Error::io(tmp, e))
        })
        .unwrap();
        // A failing fill leaves the earlier directory as it was, and no temporary behind.
        let failed = replace_dir_atomically(&target, |tmp| {
            std::fs::write(tmp.join("b"), b"2").map_err(|e| Error::io(tmp, e))?;
            Err::<(), _>(Error::io(tmp, std::io::Error::other("disk full")))
        });
        assert!(failed.is_err());
        assert_eq!(std::fs::read(target.join("a")).unwrap(), b"1");
        assert!(!target.join("b").exists());
        // A second success replaces the first entirely.
        replace_dir_atomically(&target, |tmp| {
            std::fs::write(tmp.join("c"), b"3").map_err(|e| Error::io(tmp, e))
        })
        .unwrap();
        assert!(!target.join("a").exists() && target.join("c").exists());
        let names: Vec<_> = std::fs::read_dir(work.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["out"], "no temporary left: {names:?}");
    }
}
