//! `llmscope serve` and `llmscope mock-upstream`: the two long-running servers.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};

/// Serve a stand-in provider on `listen`, answering as `options` say.
pub(super) fn mock_upstream(
    listen: SocketAddr,
    options: crate::mock_upstream::Options,
) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        {
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "mock upstream listening on http://{}",
                listener.local_addr()?
            )?;
            out.flush()?;
        }
        crate::mock_upstream::serve(listener, options).await?;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Run the gateway from `config` until SIGINT or SIGTERM; `listen` overrides `server.listen`.
pub(super) fn serve(config: &Path, listen: Option<SocketAddr>) -> Result<ExitCode> {
    let env = |name: &str| std::env::var(name).ok();
    let mut cfg = crate::config::GatewayConfig::load(config, &env)?;
    if let Some(addr) = listen {
        cfg.listen = addr;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let hot_reload = cfg.hot_reload;
        let addr = cfg.listen;
        // SIGHUP (logrotate's postrotate) must not kill a gateway that is still starting
        // (recovery, ingesting large logs): take it over before the start.
        #[cfg(unix)]
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        // The exporter's blocking HTTP client must not be built on a runtime worker.
        tokio::task::block_in_place(|| crate::otel::init(&env));
        let gateway = tokio::task::block_in_place(|| crate::gateway::Gateway::start(cfg, &env))?;
        tokio::task::block_in_place(|| crate::otel::init_metrics(&env, Arc::downgrade(&gateway)));
        let listener = crate::server::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
        let bound = listener.local_addr()?;
        let refresher = {
            let gw = Arc::clone(&gateway);
            tokio::spawn(async move {
                let interval = gw.config().refresh_interval;
                loop {
                    tokio::time::sleep(interval).await;
                    let g = Arc::clone(&gw);
                    let refreshed = tokio::task::spawn_blocking(move || {
                        let refreshed = g.refresh();
                        // After publishing: compaction holds the engine for a while.
                        if refreshed.is_ok() {
                            if let Err(e) = g.engine().compact() {
                                tracing::warn!(error = %e, "compressing the analytics tables failed; they stay uncompressed until the next try");
                            }
                        }
                        refreshed
                    });
                    match refreshed.await {
                        Ok(Err(e)) => tracing::error!(error = %e, "aggregate refresh failed; budgets use the last published values plus the ledger"),
                        Err(e) => tracing::error!(error = %e, "aggregate refresh task failed"),
                        Ok(Ok(_)) => {}
                    }
                    gw.record_unreported().await;
                }
            })
        };
        #[cfg(unix)]
        {
            // SIGHUP: reopen the logs (after logrotate moved them; a rename is also noticed
            // on the next write without it).
            let gw = Arc::clone(&gateway);
            if let Some(mut hup) = hup {
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        tracing::info!("SIGHUP: reopening the logs");
                        gw.reopen_logs();
                    }
                });
            }
        }
        let _watcher = if hot_reload { Some(crate::reload::watch(Arc::clone(&gateway)).context("watching the policy files")?) } else { None };
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "llmscope listening on http://{bound}")?;
            out.flush()?;
        }
        tracing::info!(%bound, "serving");
        let served = crate::server::serve(gateway, listener, shutdown_signal()).await;
        tokio::task::block_in_place(crate::otel::shutdown);
        served?;
        refresher.abort();
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
