//! A network namespace of the test's own, joined to the host by veth pairs, so one process can
//! be partitioned for real (`ip link set down`) while everything else keeps running. Needs root
//! (`ip netns`); a test that needs it fails, with what to do, when it cannot create one.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// One veth pair: the host's end and the namespace's end, each with an address in a /24 of its
/// own.
struct Link {
    host_if: String,
    host_ip: Ipv4Addr,
    inner_ip: Ipv4Addr,
}

/// A network namespace with one or more veth links to the host; deleted (with its links) on
/// drop. Processes started in it (`ip netns exec NAME ...`) reach the host only through its
/// links, at [`host_ip`](Netns::host_ip), and are reached at [`inner_ip`](Netns::inner_ip).
pub struct Netns {
    name: String,
    links: Vec<Link>,
}

fn ip(args: &[&str]) {
    let output = Command::new("ip").args(args).output().expect("run ip (iproute2)");
    assert!(
        output.status.success(),
        "`ip {}` failed: {} (network namespaces need root and iproute2)",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
}

impl Netns {
    /// Creates a namespace with `links` veth links to the host (10.2xx.K.0/24 subnets unique to
    /// this test process), loopback up inside.
    pub fn create(links: usize) -> Netns {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let name = format!("chat-t{pid}-{n}");
        // A /24 per link: the third octet from the pid and counter, the second from the link.
        let octet = ((pid.wrapping_mul(7) + n * 13) % 250 + 1) as u8;
        ip(&["netns", "add", &name]);
        let mut netns = Netns { name, links: Vec::new() };
        ip(&["netns", "exec", &netns.name, "ip", "link", "set", "lo", "up"]);
        for l in 0..links {
            let host_if = format!("ct{}{}h{l}", pid % 100_000, n);
            let inner_if = format!("ct{}{}n{l}", pid % 100_000, n);
            let second = 230 + l as u8;
            let (host_ip, inner_ip) = (Ipv4Addr::new(10, second, octet, 1), Ipv4Addr::new(10, second, octet, 2));
            ip(&["link", "add", &host_if, "type", "veth", "peer", "name", &inner_if]);
            ip(&["link", "set", &inner_if, "netns", &netns.name]);
            ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &host_if]);
            ip(&["link", "set", &host_if, "up"]);
            ip(&["netns", "exec", &netns.name, "ip", "addr", "add", &format!("{inner_ip}/24"), "dev", &inner_if]);
            ip(&["netns", "exec", &netns.name, "ip", "link", "set", &inner_if, "up"]);
            netns.links.push(Link { host_if, host_ip, inner_ip });
        }
        netns
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host's address on link `link`: a service bound there is reachable from the host
    /// always and from the namespace while the link is up.
    pub fn host_ip(&self, link: usize) -> Ipv4Addr {
        self.links[link].host_ip
    }

    /// The namespace's address on link `link`.
    pub fn inner_ip(&self, link: usize) -> Ipv4Addr {
        self.links[link].inner_ip
    }

    /// `host_ip(link):0`, to bind a listener the namespace can reach.
    pub fn host_bind(&self, link: usize) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.host_ip(link)), 0)
    }

    /// Relays `listen`, an address inside the namespace, to `target`, reached from inside (so
    /// through a link): say the store's advertised `127.0.0.1:9142` inside to a [`Relay`](crate::Relay)
    /// on a link's host address. Stops on drop.
    pub fn relay_inside(&self, listen: SocketAddr, target: SocketAddr) -> InsideRelay {
        let path = format!("/run/netns/{}", self.name);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (bound, is_bound) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let netns = std::fs::File::open(&path).expect("open the namespace");
            // Only this thread moves: its sockets live in the namespace.
            nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET).expect("enter the namespace");
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("relay runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind(listen).await.expect("bind inside the namespace");
                let _ = bound.send(());
                let accept = async {
                    while let Ok((mut inbound, _)) = listener.accept().await {
                        tokio::spawn(async move {
                            let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else { return };
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        });
                    }
                };
                tokio::select! {
                    () = accept => {}
                    _ = stopped => {}
                }
            });
        });
        is_bound.recv().expect("the relay inside the namespace started");
        InsideRelay { _stop: stop }
    }

    /// Partitions link `link`: nothing crosses it until [`heal`](Netns::heal) (open TCP
    /// connections stall, as in a real partition; they are not reset).
    pub fn cut(&self, link: usize) {
        ip(&["link", "set", &self.links[link].host_if, "down"]);
    }

    /// Brings link `link` back.
    pub fn heal(&self, link: usize) {
        ip(&["link", "set", &self.links[link].host_if, "up"]);
    }
}

/// A relay running inside a namespace ([`Netns::relay_inside`]); stops on drop.
pub struct InsideRelay {
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Drop for Netns {
    fn drop(&mut self) {
        for link in &self.links {
            let _ = Command::new("ip").args(["link", "del", &link.host_if]).output();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}
