"""Probes that read Prometheus: the SLO burn rate and alerts (deploy/prometheus/alerts.yml)."""

import json
import os
import urllib.parse
import urllib.request

#: The send-availability SLO: 99.9 % of sends succeed (docs/slos.md).
SEND_ERROR_BUDGET = 0.001


def _prometheus() -> str:
    return os.environ.get("CHAT_PROMETHEUS_URL", "http://127.0.0.1:9090")


def _get(path: str) -> dict:
    with urllib.request.urlopen(_prometheus() + path, timeout=5) as response:
        return json.loads(response.read())


def send_burn_rate(window: str = "5m") -> float:
    """How fast the send-availability error budget burns: the error ratio over `window` divided
    by the budget (1 = exactly on budget). No data yet counts as 0."""
    query = urllib.parse.quote(f"chat:send_errors:ratio_rate{window}")
    result = _get(f"/api/v1/query?query={query}")["data"]["result"]
    ratio = max((float(sample["value"][1]) for sample in result), default=0.0)
    if ratio != ratio:  # NaN: no sends in the window
        ratio = 0.0
    burn = ratio / SEND_ERROR_BUDGET
    print(f"send burn rate over {window}: {burn:.2f}")
    return burn


def alert_firing(name: str) -> bool:
    """Whether alert `name` fires in Prometheus right now."""
    alerts = _get("/api/v1/alerts")["data"]["alerts"]
    return any(a["labels"].get("alertname") == name and a["state"] == "firing" for a in alerts)


def alert_not_firing(name: str) -> bool:
    """The safeguard's view: True while alert `name` does not fire."""
    return not alert_firing(name)


def announce_experiment(name: str, minutes: float = 10.0, ended: bool = False) -> str:
    """Tells Alertmanager (CHAT_ALERTMANAGER_URL, e.g. http://127.0.0.1:9093) that a planned
    experiment runs: the `PlannedExperiment` alert, which deploy/alertmanager/alertmanager.yml
    uses to hold back pages. `ended=True` resolves it. Without an Alertmanager, does nothing."""
    import datetime

    base = os.environ.get("CHAT_ALERTMANAGER_URL")
    if not base:
        return "no Alertmanager (CHAT_ALERTMANAGER_URL unset): pages are not held back"
    now = datetime.datetime.now(datetime.timezone.utc)
    ends = now if ended else now + datetime.timedelta(minutes=minutes)
    alert = [{
        "labels": {"alertname": "PlannedExperiment", "severity": "none", "experiment": name},
        "annotations": {"summary": f"planned chaos experiment {name}"},
        "startsAt": now.isoformat(),
        "endsAt": ends.isoformat(),
    }]
    request = urllib.request.Request(
        f"{base}/api/v2/alerts", data=json.dumps(alert).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5):
        pass
    return f"PlannedExperiment {name} {'resolved' if ended else f'announced for {minutes} min'}"
