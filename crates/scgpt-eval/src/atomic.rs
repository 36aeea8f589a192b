//! Output files appear whole or not at all: a reader (or a rerun after a crash) never sees a
//! half-written report.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// A temporary path next to `dir/name` that keeps the extension (the PNG encoder picks the
/// format from it).
pub(crate) fn temp_path(dir: &Path, name: &str) -> PathBuf {
    let (stem, ext) = match name.rsplit_once('.') {
        Some((s, e)) => (s, format!(".{e}")),
        None => (name, String::new()),
    };
    dir.join(format!(".{stem}.tmp-{}{ext}", std::process::id()))
}

/// Moves a finished temporary file onto `dir/name`.
pub(crate) fn commit(tmp: &Path, dir: &Path, name: &str) -> Result<PathBuf> {
    let dest = dir.join(name);
    fs::rename(tmp, &dest).with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
    Ok(dest)
}

/// Writes `bytes` to `dir/name` through a temporary file in `dir` and a rename; creates `dir`.
pub fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = temp_path(dir, name);
    let result = (|| -> Result<()> {
        let mut f = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes).with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all().with_context(|| format!("syncing {}", tmp.display()))?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    commit(&tmp, dir, name)
}
