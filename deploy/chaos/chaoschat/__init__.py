"""Chaos Toolkit actions and probes for the chat system's local cluster (deploy/local/up).

Actions break one process or link and put it back; probes read the evidence: the loadgen
audit, the SLO burn rate and alerts from Prometheus. Every function takes plain arguments so
experiments (deploy/chaos/experiments/*.json) name them directly:

    {"type": "python", "module": "chaoschat", "func": "kill_process",
     "arguments": {"name": "fanout-1"}}

The cluster's state lives in CHAT_LOCAL_DIR (default target/local-cluster): pid files, the
admin token, the background load's report. See deploy/chaos/README.md.
"""

from chaoschat.cluster import (
    clear_faults,
    freeze_process,
    heal_process,
    inject_fault,
    kill_process,
    partition_process,
    restore_cluster,
    thaw_process,
    throttle_process,
    unthrottle_process,
)
from chaoschat.load import load_audit_passed, send_to_delivery_p99_ms, start_load
from chaoschat.prometheus import alert_firing, alert_not_firing, announce_experiment, send_burn_rate

__all__ = [
    "alert_firing",
    "alert_not_firing",
    "announce_experiment",
    "clear_faults",
    "freeze_process",
    "heal_process",
    "inject_fault",
    "kill_process",
    "load_audit_passed",
    "partition_process",
    "restore_cluster",
    "send_burn_rate",
    "send_to_delivery_p99_ms",
    "start_load",
    "thaw_process",
    "throttle_process",
    "unthrottle_process",
]
