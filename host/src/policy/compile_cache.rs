//! The compile cache's trust check: compiled components are native code, and their file
//! names (digests) are public, so a cache is used only where no one else could have planted
//! a file.

use std::path::Path;

/// Create `dir` (mode 0700) if needed; true when this process may load native code from it:
/// see [`check_private`]. Anything else is logged and the cache is not used (components are
/// compiled at every start instead).
#[cfg(unix)]
pub(super) fn private_dir(dir: &Path) -> bool {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.exists() {
        let _ = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir);
    }
    match check_private(dir, current_uid()) {
        Ok(()) => true,
        Err(why) => {
            tracing::warn!(dir = %dir.display(), reason = %why, "compile cache not used: it holds native code, so only a directory no one else can write is trusted");
            false
        }
    }
}

/// Without Unix ownership and modes there is no cheap way to tell who could have planted a
/// file: no cache.
#[cfg(not(unix))]
pub(super) fn private_dir(dir: &Path) -> bool {
    tracing::warn!(dir = %dir.display(), "compile cache is only used on Unix; compiling components at every start");
    false
}

#[cfg(unix)]
pub(super) fn current_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    #[allow(unsafe_code, reason = "geteuid(2) is always safe to call")]
    unsafe {
        libc::geteuid()
    }
}

/// `dir` is a directory owned by `uid`, writable by no one else, and every directory above it
/// is owned by `uid` or root and writable only by its owner — or, like `/tmp`, has the sticky
/// bit (others cannot rename or replace what is ours). Otherwise someone else could plant a
/// `<digest>.cwasm` (digests are public) that this process would run as native code.
#[cfg(unix)]
fn check_private(dir: &Path, uid: u32) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let dir = dir
        .canonicalize()
        .map_err(|e| format!("cannot resolve the path: {e}"))?;
    let m = std::fs::metadata(&dir).map_err(|e| e.to_string())?;
    if !m.is_dir() {
        return Err("not a directory".into());
    }
    if m.uid() != uid {
        return Err(format!(
            "owned by uid {}, not by the running user (uid {uid})",
            m.uid()
        ));
    }
    if m.mode() & 0o022 != 0 {
        return Err(format!(
            "mode {:o} lets group or others write; chmod 700 it",
            m.mode() & 0o7777
        ));
    }
    for above in dir.ancestors().skip(1) {
        let m = std::fs::metadata(above).map_err(|e| format!("{}: {e}", above.display()))?;
        if m.uid() != uid && m.uid() != 0 {
            return Err(format!(
                "{} is owned by uid {}, neither the running user nor root",
                above.display(),
                m.uid()
            ));
        }
        if m.mode() & 0o022 != 0 && m.mode() & 0o1000 == 0 {
            return Err(format!(
                "{} (mode {:o}) lets group or others write without the sticky bit",
                above.display(),
                m.mode() & 0o7777
            ));
        }
    }
    Ok(())
}

/// A cache file is used only when it is a regular file (not a link) owned by `uid` and
/// writable by no one else.
#[cfg(unix)]
pub(super) fn trusted_file(file: &Path, uid: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(file)
        .is_ok_and(|m| m.is_file() && m.uid() == uid && m.mode() & 0o022 == 0)
}

#[cfg(not(unix))]
pub(super) fn trusted_file(_file: &Path, _uid: u32) -> bool {
    false
}

#[cfg(not(unix))]
pub(super) fn current_uid() -> u32 {
    0
}

/// Write `bytes` to `file` through a temporary (mode 0600) renamed over it.
pub(super) fn write_private(file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = file.with_extension(format!("tmp{}", std::process::id()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(&tmp)?.write_all(bytes)?;
    std::fs::rename(&tmp, file)
}
