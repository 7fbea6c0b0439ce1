//! `capsule serve`: the sandbox manager. It keeps its state in SQLite,
//! runs one supervised `capsule-vmm` child per sandbox, and serves the HTTP
//! API on a Unix socket (0600, `$CAPSULE_HOME/api.sock`) or, with
//! `--listen`, on TCP behind a bearer token.
//!
//! ```text
//! $CAPSULE_HOME/
//!     api.sock       the API (only this user can connect)
//!     daemon/
//!         state.db   sandboxes, groups, sealed secrets, events (SQLite, WAL)
//!         secret.key the key secrets are sealed with (0600; not in state.db)
//!         vms/<id>/  each sandbox's child (see supervisor)
//! ```

mod child;
pub mod gateway;
pub mod logging;
pub mod metrics;
mod pidfd;
pub mod pool;
pub mod ports;
pub mod stats;
pub mod supervisor;
mod suspend;
pub mod templates;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::store::Store;
use supervisor::Supervisor;

/// What every request handler can reach.
pub struct AppState {
    pub supervisor: Arc<Supervisor>,
    /// Seals and opens secrets with the host key (`daemon/secret.key`).
    pub sealer: crate::secrets::Sealer,
    /// The guest kernel and initramfs used when a create names none.
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// Where previews are served, if they are (`--gateway`).
    pub gateway: Option<gateway::Gateway>,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Also listen on this TCP address (e.g. 127.0.0.1:7878); every
    /// request there needs `Authorization: Bearer <token>`, the token read
    /// from --token-file.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// File holding the bearer token for --listen (made, 0600, with a fresh
    /// token if missing).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Guest kernel for sandboxes that name none.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initramfs holding the guest agent, for sandboxes that name none.
    #[arg(long)]
    pub initramfs: Option<PathBuf>,
    /// The most sandboxes this host runs at once, over every group (more
    /// are refused with 429 `host_full`).
    #[arg(long)]
    pub max_sandboxes: Option<u32>,
    /// Serve HTTP previews on this address (e.g. 127.0.0.1:7880):
    /// `http://<port>-<sandbox id>.<domain>:<its port>/` reaches that
    /// exposed port of that sandbox, WebSocket upgrades included.
    #[arg(long, value_name = "ADDR")]
    pub gateway: Option<SocketAddr>,
    /// The domain preview host names end in (`localhost` resolves to
    /// loopback with no DNS set-up; a wildcard DNS name for remote use).
    #[arg(long, default_value = "localhost", value_name = "DOMAIN")]
    pub preview_domain: String,
    /// How the log on stderr is written; its level is CAPSULE_LOG's
    /// (`info` unless set; `debug`, `warn`, or a tracing filter).
    #[arg(long, value_enum, default_value_t)]
    pub log_format: logging::LogFormat,
}

/// The API socket: `$CAPSULE_HOME/api.sock`.
pub fn socket_path() -> Result<PathBuf> {
    Ok(crate::keeper::home()?.join("api.sock"))
}

pub fn serve(args: ServeArgs) -> Result<u8> {
    logging::init(args.log_format)?;
    let home = crate::keeper::home()?;
    let root = home.join("daemon");
    vmm::private::ensure_private_dir(&root)?;
    let kernel = crate::artifacts::find(
        args.kernel.as_deref(),
        "CAPSULE_KERNEL",
        crate::artifacts::KERNEL_FILE,
    )?;
    let initramfs = crate::artifacts::find(
        args.initramfs.as_deref(),
        "CAPSULE_INITRAMFS",
        crate::artifacts::INITRAMFS_FILE,
    )?;
    let store = Store::open(&root.join("state.db")).context("opening the state database")?;
    let sealer = crate::secrets::Sealer::open_or_create(&root.join("secret.key"))?;
    let supervisor = Supervisor::new(root, Arc::new(Mutex::new(store)), args.max_sandboxes)?;
    supervisor
        .adopt()
        .context("adopting the sandboxes left running")?;
    supervisor
        .remove_strays()
        .context("removing what no sandbox owns")?;
    let refill = Arc::clone(&supervisor);
    std::thread::Builder::new()
        .name("pool-refill".into())
        .spawn(move || loop {
            if !refill.refill_one() {
                std::thread::sleep(Duration::from_millis(250));
            }
        })
        .context("starting the pool refill thread")?;
    let token = match (&args.listen, &args.token_file) {
        (Some(_), Some(path)) => Some(crate::bearer::read_or_make(path)?),
        (Some(_), None) => bail!("--listen needs --token-file: TCP requests need a bearer token"),
        (None, _) => None,
    };
    let gateway = args
        .gateway
        .map(|addr| gateway::start(Arc::clone(&supervisor), addr, args.preview_domain.clone()))
        .transpose()?;
    let state = Arc::new(AppState {
        supervisor,
        sealer,
        kernel,
        initramfs,
        gateway,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(state, socket_path()?, args.listen, token))?;
    Ok(0)
}

async fn run(
    state: Arc<AppState>,
    socket: PathBuf,
    listen: Option<SocketAddr>,
    token: Option<String>,
) -> Result<()> {
    let app = crate::api::router(Arc::clone(&state));
    // A socket left by a daemon that died is replaced; a live one is not.
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        bail!("a daemon is already serving {}", socket.display());
    }
    let _ = std::fs::remove_file(&socket);
    let unix = tokio::net::UnixListener::bind(&socket)
        .with_context(|| format!("listening on {}", socket.display()))?;
    std::fs::set_permissions(&socket, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    tracing::info!("serving the API on {}", socket.display());

    let expiry = Arc::clone(&state.supervisor);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let supervisor = Arc::clone(&expiry);
            let _ = tokio::task::spawn_blocking(move || {
                supervisor.expire(crate::store::now_ms());
                supervisor.suspend_idle();
            })
            .await;
        }
    });

    if let (Some(addr), Some(token)) = (listen, token) {
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        tracing::info!("serving the API on http://{addr} (bearer token required)");
        let guarded = crate::bearer::guard(app.clone(), token);
        tokio::spawn(async move {
            if let Err(e) = axum::serve(tcp, guarded).await {
                tracing::error!("TCP listener: {e}");
            }
        });
    }
    axum::serve(unix, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving the API")?;
    let _ = std::fs::remove_file(&socket);
    // The sandboxes keep running; the next daemon adopts them.
    tracing::info!("stopped; sandboxes keep running for the next `capsule serve`");
    Ok(())
}

pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
