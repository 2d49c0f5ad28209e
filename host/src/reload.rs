//! Hot reload: watch the policy file and the policies directory; on a change, validate the new
//! configuration and components and swap them in atomically. An invalid change is rejected with a
//! logged error while the previous set keeps serving; requests already evaluating finish on the
//! set they started with.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};

use crate::gateway::Gateway;

/// How long to wait for a burst of file events (an editor's save, a copy) to settle.
const DEBOUNCE: Duration = Duration::from_millis(300);

/// Start watching; keep the returned watcher alive for as long as reloads should happen.
pub fn watch(gateway: Arc<Gateway>) -> notify::Result<RecommendedWatcher> {
    let (file, dir) = gateway.watched_paths();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (watch_file, watch_dir) = (file.clone(), dir.clone());
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(event) = res {
            if relevant(&event, &watch_file, &watch_dir) {
                let _ = tx.send(());
            }
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    if let Some(parent) = file.parent().filter(|p| !p.as_os_str().is_empty()) {
        if parent != dir {
            // Watch the directory, not the file: editors replace files by renaming over them.
            watcher.watch(parent, RecursiveMode::NonRecursive)?;
        }
    }
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            tokio::time::sleep(DEBOUNCE).await;
            while rx.try_recv().is_ok() {}
            let gw = Arc::clone(&gateway);
            let _ = tokio::task::spawn_blocking(move || gw.reload_policies()).await;
        }
    });
    Ok(watcher)
}

fn relevant(event: &notify::Event, file: &Path, dir: &Path) -> bool {
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
            same_file(p, file)
                || (p.parent().is_some_and(|parent| same_file(parent, dir))
                    && p.extension().is_some_and(|x| x == "wasm"))
        })
}

fn same_file(a: &Path, b: &Path) -> bool {
    let canon =
        |p: &Path| -> PathBuf { std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()) };
    a == b || canon(a) == canon(b)
}
