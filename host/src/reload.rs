//! Hot reload: watch the policy file and the policies directory; on a change, validate the new
//! configuration and components and swap them in atomically. An invalid change is rejected with a
//! logged error while the previous set keeps serving; requests already evaluating finish on the
//! set they started with.
//!
//! What is watched is what the paths resolve to, not only the names: a Kubernetes ConfigMap
//! volume updates by swapping its `..data` symlink (`policy.yaml -> ..data/policy.yaml`), which
//! touches no event path named like the policy file. So any change in a watched directory
//! compares a fingerprint of the resolved files (target path, length, modification time) with
//! the one last seen, and reloads when it differs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};

use crate::gateway::Gateway;

/// How long to wait for a burst of file events (an editor's save, a copy) to settle.
const DEBOUNCE: Duration = Duration::from_millis(300);

/// Start watching; keep the returned watcher alive for as long as reloads should happen.
pub fn watch(gateway: Arc<Gateway>) -> notify::Result<RecommendedWatcher> {
    let (file, dir) = gateway.watched_paths();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut dirs = vec![dir.clone()];
    if let Some(parent) = file.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !same_file(parent, &dir) {
            // Watch the directory, not the file: editors replace files by renaming over them.
            dirs.push(parent.to_path_buf());
        }
    }
    let watch_dirs = dirs.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(event) = res {
            if relevant(&event, &watch_dirs) {
                let _ = tx.send(());
            }
        }
    })?;
    for d in &dirs {
        watcher.watch(d, RecursiveMode::NonRecursive)?;
    }
    tokio::spawn(async move {
        let mut seen = fingerprint(&file, &dir);
        while rx.recv().await.is_some() {
            tokio::time::sleep(DEBOUNCE).await;
            while rx.try_recv().is_ok() {}
            let now = fingerprint(&file, &dir);
            if now == seen {
                continue;
            }
            seen = now;
            let gw = Arc::clone(&gateway);
            let _ = tokio::task::spawn_blocking(move || gw.reload_policies()).await;
        }
    });
    Ok(watcher)
}

/// A change of anything in a watched directory (the fingerprint decides whether it matters).
fn relevant(event: &notify::Event, dirs: &[PathBuf]) -> bool {
    let changes = matches!(
        event.kind,
        EventKind::Create(_)
            | EventKind::Remove(_)
            | EventKind::Modify(
                notify::event::ModifyKind::Data(_)
                    | notify::event::ModifyKind::Name(_)
                    | notify::event::ModifyKind::Any
            )
    );
    changes
        && event.paths.iter().any(|p| {
            p.parent()
                .is_some_and(|parent| dirs.iter().any(|d| same_file(parent, d)))
        })
}

/// One watched file as resolved: the path it leads to (through symlinks), its length and
/// modification time; `None` when it cannot be read.
type Resolved = Option<(PathBuf, u64, Option<SystemTime>)>;

/// The policy file and every `.wasm` in the policies directory, resolved.
fn fingerprint(file: &Path, dir: &Path) -> Vec<Resolved> {
    let resolve = |p: &Path| -> Resolved {
        let target = std::fs::canonicalize(p).ok()?;
        let m = std::fs::metadata(&target).ok()?;
        Some((target, m.len(), m.modified().ok()))
    };
    let mut wasm: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "wasm"))
                .collect()
        })
        .unwrap_or_default();
    wasm.sort();
    std::iter::once(resolve(file))
        .chain(wasm.iter().map(|p| resolve(p)))
        .collect()
}

fn same_file(a: &Path, b: &Path) -> bool {
    let canon =
        |p: &Path| -> PathBuf { std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()) };
    a == b || canon(a) == canon(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configmap_symlink_swap_changes_the_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("..v1")).unwrap();
        std::fs::write(root.join("..v1/policy.yaml"), "version: \"1\"\n").unwrap();
        std::os::unix::fs::symlink("..v1", root.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/policy.yaml", root.join("policy.yaml")).unwrap();
        let file = root.join("policy.yaml");
        let before = fingerprint(&file, root);
        assert_eq!(
            before,
            fingerprint(&file, root),
            "stable while nothing changes"
        );
        std::fs::create_dir(root.join("..v2")).unwrap();
        std::fs::write(root.join("..v2/policy.yaml"), "version: \"1\"\n").unwrap();
        std::os::unix::fs::symlink("..v2", root.join("..data_tmp")).unwrap();
        std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
        assert_ne!(before, fingerprint(&file, root), "same content, other file");
    }
}
