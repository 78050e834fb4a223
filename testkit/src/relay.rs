//! A loopback TCP relay a test cuts and restores, to partition one process from a service.

use std::net::SocketAddr;

/// A loopback TCP relay to a service. Point one process at [`addr`](Relay::addr) instead of
/// the service and [`cut`](Relay::cut) it off: every relayed connection is closed and new ones
/// are closed on arrival until [`restore`](Relay::restore). Stops on drop.
pub struct Relay {
    addr: SocketAddr,
    open: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Starts relaying a dynamic loopback port to `target`.
    pub async fn start(target: SocketAddr) -> Relay {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), target).await
    }

    /// Starts relaying `listen` (say, a [`Netns`](crate::Netns) link's host address, port 0) to
    /// `target`.
    pub async fn start_on(listen: SocketAddr, target: SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind(listen).await.expect("bind relay port");
        let addr = listener.local_addr().expect("relay address");
        let open = std::sync::Arc::new(tokio::sync::watch::Sender::new(true));
        let gate = open.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut closed = gate.subscribe();
                if !*closed.borrow_and_update() {
                    continue; // cut: the connection is dropped at once
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = closed.wait_for(|open| !open) => {}
                    }
                });
            }
        });
        Relay { addr, open, accept }
    }

    /// The address to connect to instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every relayed connection and refuses new ones.
    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    /// Relays again.
    pub fn restore(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}
