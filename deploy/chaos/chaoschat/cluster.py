"""Actions on the local cluster's processes and links: kill, freeze, faults, partitions, throttling."""

import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

#: HTTP ports of the chat processes deploy/local/up starts (on 127.0.0.1, or on the process's
#: own address with --netns).
HTTP_PORTS = {"gateway-1": 8081, "gateway-2": 8082, "fanout-1": 9091, "fanout-2": 9092}


def local_dir() -> Path:
    """The local cluster's state directory (CHAT_LOCAL_DIR, default target/local-cluster)."""
    return Path(os.environ.get("CHAT_LOCAL_DIR", ROOT / "target" / "local-cluster"))


def _pid(name: str) -> int:
    """The pid of process `name`: gateway-N, fanout-N, nats, nats-N or cassandra."""
    if name == "cassandra":
        path = local_dir() / "cassandra" / "cassandra.pid"
    else:
        path = local_dir() / f"{name}.pid"
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError) as e:
        raise RuntimeError(f"no running process {name!r} (no pid in {path}): {e}") from e


def _signal(name: str, sig: signal.Signals) -> str:
    pid = _pid(name)
    os.kill(pid, sig)
    return f"{sig.name} sent to {name} (pid {pid})"


def kill_process(name: str) -> str:
    """kill -9 of process `name`; `restore_cluster` starts it again."""
    return _signal(name, signal.SIGKILL)


def freeze_process(name: str) -> str:
    """SIGSTOP: the process holds its sockets and answers nothing."""
    return _signal(name, signal.SIGSTOP)


def thaw_process(name: str) -> str:
    """SIGCONT: a frozen process runs again."""
    return _signal(name, signal.SIGCONT)


def base_url(name: str) -> str:
    """http://ADDR:PORT of chat process `name` (its address under --netns)."""
    address = local_dir() / "netns" / f"{name}.addr"
    host = address.read_text().strip() if address.exists() else "127.0.0.1"
    return f"http://{host}:{HTTP_PORTS[name]}"


def _admin(name: str, method: str, path: str, body: dict | None = None) -> str:
    token = (local_dir() / "admin-token").read_text().strip()
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        base_url(name) + path,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.read().decode()


def inject_fault(target: str, hop: str, action: str, probability: float = 1.0, delay_ms: int = 0,
                 room: str | None = None) -> str:
    """Plants a fault through process `target`'s admin API (docs/exercises/README.md lists the
    hops and actions)."""
    fault = {"hop": hop, "action": action, "probability": probability, "seed": 7}
    if delay_ms:
        fault["delay_ms"] = delay_ms
    if room:
        fault["room"] = room
    return _admin(target, "POST", "/admin/faults", fault)


def clear_faults() -> str:
    """Clears every fault on every chat process that answers (a rollback)."""
    cleared = []
    for name in HTTP_PORTS:
        try:
            _admin(name, "DELETE", "/admin/faults")
            cleared.append(name)
        except OSError:
            pass  # a process that is down has no faults
    return f"faults cleared on {', '.join(cleared) or 'no process'}"


def _veth(name: str) -> str:
    path = local_dir() / "netns" / f"{name}.veth"
    if not path.exists():
        raise RuntimeError(
            f"{name} has no network namespace: start the cluster with deploy/local/up --netns "
            "(partitions and throttling need it; see deploy/chaos/README.md)"
        )
    return path.read_text().strip()


def partition_process(name: str) -> str:
    """Cuts process `name`'s only link (its veth to the bridge): a real partition."""
    veth = _veth(name)
    subprocess.run(["ip", "link", "set", veth, "down"], check=True)
    return f"{name} partitioned ({veth} down)"


def heal_process(name: str) -> str:
    """Brings process `name`'s link back."""
    veth = _veth(name)
    subprocess.run(["ip", "link", "set", veth, "up"], check=True)
    return f"{name} healed ({veth} up)"


def throttle_process(name: str, rate: str = "256kbit") -> str:
    """Limits the bandwidth towards process `name` with a token bucket (tc tbf; netem is not
    available on these machines)."""
    veth = _veth(name)
    subprocess.run(
        ["tc", "qdisc", "replace", "dev", veth, "root", "tbf", "rate", rate, "burst", "16kbit", "latency", "500ms"],
        check=True,
    )
    return f"{name} throttled to {rate} on {veth}"


def unthrottle_process(name: str) -> str:
    """Removes the token bucket."""
    veth = _veth(name)
    subprocess.run(["tc", "qdisc", "del", "dev", veth, "root"], check=False)
    return f"{name} unthrottled"


def restore_cluster() -> str:
    """The universal rollback: thaws every process, heals every link, removes throttling,
    clears faults, and starts again whatever is not running (deploy/local/up is idempotent)."""
    for pidfile in list(local_dir().glob("*.pid")) + [local_dir() / "cassandra" / "cassandra.pid"]:
        try:
            os.kill(int(pidfile.read_text().strip()), signal.SIGCONT)
        except (OSError, ValueError):
            pass
    for veth_file in (local_dir() / "netns").glob("*.veth"):
        veth = veth_file.read_text().strip()
        subprocess.run(["tc", "qdisc", "del", "dev", veth, "root"], check=False, capture_output=True)
        subprocess.run(["ip", "link", "set", veth, "up"], check=False)
    args = [str(ROOT / "deploy" / "local" / "up")] + os.environ.get("CHAT_CHAOS_UP_ARGS", "").split()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    clear_faults()
    return "cluster restored"
