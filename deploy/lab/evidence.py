"""Checks the observability lab's evidence trail (deploy/lab/test runs it against deploy/lab/up).

Reads only what an operator would: Jaeger's HTTP API, Prometheus's HTTP API and Alertmanager's.
Prints one line per check and exits 1 when any fails.
"""

import argparse
import json
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

JAEGER = "http://127.0.0.1:16686"
PROMETHEUS = "http://127.0.0.1:9090"
ALERTMANAGER = "http://127.0.0.1:9093"
TARGETS = 4  # two gateways, two workers

failures = []


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def check(ok: bool, what: str) -> bool:
    print(("ok    " if ok else "FAIL  ") + what, file=sys.stderr)
    if not ok:
        failures.append(what)
    return ok


def eventually(probe, timeout_s: float):
    """`probe()` until it returns something truthy, or its last answer after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = probe()
        if answer or time.monotonic() > deadline:
            return answer
        time.sleep(1)


def instance(trace: dict, span: dict) -> str:
    process = trace["processes"][span["processID"]]
    tags = {t["key"]: t["value"] for t in process.get("tags", [])}
    return tags.get("service.instance.id", process["serviceName"])


def three_process_trace():
    """A send's trace with spans from the receiving gateway, a worker and the other gateway."""
    query = urllib.parse.urlencode({"service": "chat-gateway", "operation": "gateway.receive", "limit": 200, "lookback": "1h"})
    for trace in get(f"{JAEGER}/api/traces?{query}").get("data") or []:
        by_op = {}
        for span in trace["spans"]:
            by_op.setdefault(span["operationName"], set()).add(instance(trace, span))
        senders = by_op.get("gateway.receive", set())
        workers = {w for w in by_op.get("fanout.sequence", set()) if w.startswith("fanout-")}
        others = by_op.get("gateway.deliver", set()) - senders
        if senders and workers and others:
            return trace["traceID"], sorted(senders | workers | others)
    return None


def check_traces():
    found = eventually(three_process_trace, 30)
    if check(bool(found), "Jaeger: a send's trace spans the sending gateway, a worker and the other gateway"):
        trace_id, processes = found
        print(f"      trace {trace_id}: {', '.join(processes)}", file=sys.stderr)


def check_targets():
    def all_up():
        targets = get(f"{PROMETHEUS}/api/v1/targets")["data"]["activeTargets"]
        up = [t for t in targets if t["health"] == "up"]
        return len(up) == TARGETS and len(targets) == TARGETS and targets
    targets = eventually(all_up, 30)
    check(bool(targets), f"Prometheus: all {TARGETS} targets up")


def check_exemplars():
    def exemplar_trace_ids():
        now = time.time()
        query = urllib.parse.urlencode({"query": "chat_send_ack_seconds_bucket", "start": now - 600, "end": now})
        ids = []
        for series in get(f"{PROMETHEUS}/api/v1/query_exemplars?{query}")["data"]:
            ids += [e["labels"].get("trace_id") for e in series["exemplars"]]
        return [i for i in ids if i]
    ids = eventually(exemplar_trace_ids, 30)
    if not check(bool(ids), "Prometheus: chat_send_ack_seconds exemplars carry trace ids"):
        return
    known = [i for i in ids[-20:] if jaeger_has(i)]
    check(bool(known), f"Jaeger knows the trace of an exemplar ({len(known)} of the last {len(ids[-20:])})")


def dashboard_queries(path: str):
    """Every panel query of a Grafana dashboard, with Grafana's variables given lab values."""
    dashboard = json.load(open(path))
    panels = list(dashboard.get("panels", []))
    for panel in list(panels):
        panels += panel.get("panels", [])
    for panel in panels:
        for target in panel.get("targets", []):
            if target.get("expr"):
                expr = target["expr"].replace("$__rate_interval", "1m").replace("$__interval", "15s")
                expr = re.sub(r"\$\{?instance\}?", ".*", expr)
                yield panel.get("title", "?"), expr


def jaeger_has(trace_id: str) -> bool:
    try:
        return bool(get(f"{JAEGER}/api/traces/{trace_id}").get("data"))
    except urllib.error.HTTPError as error:
        if error.code == 404:  # Jaeger answers an unknown trace id with 404
            return False
        raise


def check_dashboard(path: str):
    bad = []
    count = 0
    for title, expr in dashboard_queries(path):
        count += 1
        try:
            result = get(f"{PROMETHEUS}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))["data"]["result"]
        except Exception as error:  # a parse error is a 400 from Prometheus
            bad.append(f"{title}: {expr}: {error}")
            continue
        if not result:
            bad.append(f"{title}: {expr}: empty result")
    for line in bad:
        print(f"      {line}", file=sys.stderr)
    check(count > 0 and not bad, f"Prometheus answers all {count} queries of {path}")


def check_alert():
    def firing_in_prometheus():
        alerts = get(f"{PROMETHEUS}/api/v1/alerts")["data"]["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == "ChatFaultInjectionActive" and a["state"] == "firing"]
    firing = eventually(firing_in_prometheus, 60)
    if not check(bool(firing), "Prometheus: the injected fault fires ChatFaultInjectionActive"):
        return

    def received_by_alertmanager():
        return [a for a in get(f"{ALERTMANAGER}/api/v2/alerts") if a["labels"].get("alertname") == "ChatFaultInjectionActive"]
    check(bool(eventually(received_by_alertmanager, 60)), "Alertmanager: received ChatFaultInjectionActive")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dashboard", required=True)
    args = parser.parse_args()
    check_targets()
    check_traces()
    check_exemplars()
    check_alert()
    check_dashboard(args.dashboard)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
