//! fedsb-server: the coordinator daemon's library.
//!
//! - [`config`]: the run configuration (TOML).
//! - [`round`]: the round state machine (pure: no I/O, no clock).
//! - [`coordinator`]: one run — engine, store, blobs, ledger, evaluation (setup, events, traffic, reports).
//! - [`service`]: the gRPC handlers (the only place tonic types meet the run).
//! - [`store`]: SQLite state and content-addressed blob files, behind the [`store::RunStore`] trait (with an
//!   in-memory twin, [`store::mem::MemStore`]).
//! - [`net`]: byte counting on the socket.
//! - [`certs`]: development certificates.
//! - [`local`]: a whole federation on one machine.
//! - [`loadbench`]: the coordinator load benchmark (`fedsb-server bench`).
//! - [`sweep`]: experiment sweeps over methods, ranks, seeds and splits (`fedsb-server sweep`).
pub mod certs;
pub mod config;
pub mod coordinator;
pub mod loadbench;
pub mod local;
pub mod net;
pub mod round;
pub mod service;
pub mod store;
pub mod sweep;

use std::sync::Arc;
use std::time::Duration;

use tonic::transport::{Server, ServerTlsConfig};

/// Serves `coord`'s run on `listener` (TLS when `tls` is given) until the run finishes (plus `linger`, so
/// clients learn the outcome) or Ctrl-C. A ticker advances the round engine every 100 ms.
pub async fn serve(
    coord: Arc<coordinator::Coordinator>,
    listener: tokio::net::TcpListener,
    tls: Option<ServerTlsConfig>,
    linger: Duration,
) -> anyhow::Result<()> {
    let interrupted = async {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::warn!("interrupted; the run can continue with --resume");
        } else {
            std::future::pending::<()>().await;
        }
    };
    serve_until(coord, listener, tls, linger, interrupted).await
}

/// Like [`serve`], stopping early when `stop` completes (the run can then be resumed).
pub async fn serve_until(
    coord: Arc<coordinator::Coordinator>,
    listener: tokio::net::TcpListener,
    tls: Option<ServerTlsConfig>,
    linger: Duration,
    stop: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let ticker = {
        let c = coord.clone();
        tokio::spawn(async move {
            loop {
                // A tick may write a failed round to the store: off the async threads.
                let t = c.clone();
                if let Err(e) = tokio::task::spawn_blocking(move || t.tick()).await {
                    tracing::error!("the round ticker stopped: {e}");
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let window = coord.opts.h2_window_bytes.max(64 * 1024);
    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .initial_stream_window_size(window)
        .initial_connection_window_size(window);
    if let Some(t) = tls {
        builder = builder.tls_config(t)?;
    }
    let done = {
        let c = coord.clone();
        async move {
            tokio::select! {
                _ = c.wait_finished(Duration::from_millis(500)) => tokio::time::sleep(linger).await,
                _ = stop => {}
            }
        }
    };
    let r = builder
        .add_service(service::Service::new(coord.clone()).into_server())
        .serve_with_incoming_shutdown(net::counting_incoming(listener), done)
        .await;
    ticker.abort();
    Ok(r?)
}
