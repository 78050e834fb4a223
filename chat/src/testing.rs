//! Start a real all-in-one server on a free loopback port, for integration tests of this and
//! other crates (loadgen's auditor tests use it).

use std::net::SocketAddr;
use std::path::PathBuf;

use gateway::GatewayConfig;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How to start a test server.
#[derive(Debug, Clone, Default)]
pub struct TestServerOptions {
    /// Data directory; a fresh temporary one when `None`.
    pub data_dir: Option<PathBuf>,
    /// Gateway settings (auth, admin token, limits).
    pub gateway: GatewayConfig,
}

/// A server running inside the test process.
pub struct RunningServer {
    /// `ws://127.0.0.1:PORT/ws`
    pub ws_url: String,
    /// `http://127.0.0.1:PORT`
    pub http_url: String,
    /// The bound address.
    pub addr: SocketAddr,
    /// The data directory in use.
    pub data_dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    _temp: Option<tempfile::TempDir>,
}

/// Starts an all-in-one server on `127.0.0.1:0`.
pub async fn start_all_in_one(options: TestServerOptions) -> anyhow::Result<RunningServer> {
    let (data_dir, temp) = match options.data_dir {
        Some(dir) => (dir, None),
        None => {
            let temp = tempfile::Builder::new().prefix("chat-test-").tempdir()?;
            (temp.path().to_owned(), Some(temp))
        }
    };
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let dir = data_dir.clone();
    let task = tokio::spawn(async move {
        crate::all_in_one(listener, &dir, options.gateway, crate::DEFAULT_JOURNAL_CAPACITY, async move {
            let _ = stopped.await;
        })
        .await
    });
    Ok(RunningServer {
        ws_url: format!("ws://{addr}/ws"),
        http_url: format!("http://{addr}"),
        addr,
        data_dir,
        stop: Some(stop),
        task: Some(task),
        _temp: temp,
    })
}

impl RunningServer {
    /// Drains and stops the server, returning its result.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await?,
            None => Ok(()),
        }
    }
}
