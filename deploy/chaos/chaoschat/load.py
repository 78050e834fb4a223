"""Traffic and its audit: loadgen runs in the background during an experiment's method, and the
steady-state hypothesis reads its verdict."""

import json
import os
import subprocess
import time
from pathlib import Path

from chaoschat.cluster import ROOT, base_url, local_dir

GATEWAYS = ("gateway-1", "gateway-2")


def _loadgen() -> str:
    return os.environ.get("CHAT_LOADGEN", str(ROOT / "target" / "release" / "loadgen"))


def _report_path() -> Path:
    return local_dir() / "chaos-load.json"


def _ws_urls() -> str:
    return ",".join(base_url(g).replace("http://", "ws://") + "/ws" for g in GATEWAYS)


def _loadgen_args(seconds: int, rate: int, clients: int, rooms: int, report: Path) -> list[str]:
    return [
        _loadgen(), "--url", _ws_urls(), "--clients", str(clients), "--rooms", str(rooms),
        "--rate", str(rate), "--duration", f"{seconds}s", "--drain", "20s",
        "--report", str(report), "--progress", "never",
    ]


def start_load(seconds: int = 40, rate: int = 50, clients: int = 60, rooms: int = 6) -> str:
    """Starts loadgen in the background over both gateways: `clients` clients in `rooms` rooms,
    `rate` sends/s for `seconds`; its report lands in CHAT_LOCAL_DIR/chaos-load.json."""
    report = _report_path()
    report.unlink(missing_ok=True)
    log = open(local_dir() / "chaos-load.log", "w")
    process = subprocess.Popen(_loadgen_args(seconds, rate, clients, rooms, report), stdout=log, stderr=log)
    (local_dir() / "chaos-load.pid").write_text(str(process.pid))
    return f"loadgen started (pid {process.pid}) for {seconds} s at {rate} sends/s"


def _finished_report(timeout_s: int = 180) -> dict:
    """The report of the background load, waiting for it to end. Before the method there is none:
    a short baseline load is run once per hypothesis check (its report is reused by the other
    probes of that check, for 60 s)."""
    pidfile = local_dir() / "chaos-load.pid"
    if not pidfile.exists():
        baseline = local_dir() / "chaos-baseline.json"
        if baseline.exists() and time.time() - baseline.stat().st_mtime < 60:
            return json.loads(baseline.read_text())
        baseline.unlink(missing_ok=True)
        run = subprocess.run(_loadgen_args(8, 30, 30, 3, baseline), capture_output=True, text=True, timeout=timeout_s)
        if not baseline.exists():
            raise RuntimeError(f"the baseline load wrote no report: {run.stderr.strip()[-500:]}")
        return json.loads(baseline.read_text())
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + timeout_s
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        try:  # reap it if it is our child
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.5)
    report = _report_path()
    if not report.exists():
        raise RuntimeError(f"loadgen wrote no report; see {local_dir() / 'chaos-load.log'}")
    return json.loads(report.read_text())


def load_audit_passed() -> bool:
    """Whether the load's audit passed: nothing acked lost, duplicated, reordered or gapped, every
    send answered, none refused yet stored (`unavailable` answers themselves are allowed)."""
    report = _finished_report()
    counts = report["audit"]["counts"]
    print(f"audit: passed={report['passed']} acked={report['audit']['acked']} of {report['audit']['scheduled']} "
          f"errors by code={report.get('errors', {})} counts={counts}")
    return bool(report["passed"])


def send_to_delivery_p99_ms() -> float:
    """The load's send→delivery p99 in ms (the latency SLO allows 250 ms for 99.9 %)."""
    return float(_finished_report()["latency_ms"]["send_to_delivery"]["p99"])
