"""A one-page Markdown summary of a Chaos Toolkit journal: verdict, hypothesis before and after,
what the method did and when, the rollbacks, and the load's audit."""

import json
import sys


def _probe_lines(section: dict | None) -> list[str]:
    if not section:
        return ["- (not run)"]
    lines = []
    for probe in section.get("probes", []):
        name = probe["activity"]["name"]
        verdict = "ok" if probe.get("tolerance_met") else "NOT MET"
        lines.append(f"- {name}: `{probe.get('output')}` ({verdict})")
    return lines


def _activity_lines(runs: list[dict]) -> list[str]:
    lines = []
    for run in runs:
        activity = run["activity"]
        output = run.get("output")
        text = f" → {output}" if isinstance(output, str) else ""
        error = f" **failed: {run['exception'][-1].strip()}**" if run.get("exception") else ""
        lines.append(f"- {run['start'][11:19]} {activity['name']} ({run['status']}){text}{error}")
    return lines or ["- (none)"]


def outcome(journal: dict) -> str:
    """held, deviated, not-steady (the hypothesis failed before the method) or the run's status."""
    before = journal.get("steady_states", {}).get("before") or {}
    if before.get("steady_state_met") is False:
        return "not-steady"
    if journal["status"] == "completed":
        return "deviated" if journal["deviated"] else "held"
    return journal["status"]


def summarize(journal: dict) -> str:
    experiment = journal["experiment"]
    verdict = {
        "held": "steady state HELD",
        "deviated": "steady state DEVIATED",
        "not-steady": "NOT STEADY BEFORE the method: nothing was injected",
    }.get(outcome(journal), f"run {journal['status'].upper()}")
    lines = [
        f"# {experiment['title']}",
        "",
        f"**{verdict}** — status `{journal['status']}`, {journal['duration']:.0f} s, "
        f"{journal['start'][:19]}Z to {journal['end'][:19]}Z",
        "",
        experiment.get("description", ""),
        "",
        f"## Hypothesis: {experiment['steady-state-hypothesis']['title']}",
        "",
        "Before the method:",
        *_probe_lines(journal.get("steady_states", {}).get("before")),
        "",
        "After the method:",
        *_probe_lines(journal.get("steady_states", {}).get("after")),
        "",
        "## Method",
        *_activity_lines(journal.get("run", [])),
        "",
        "## Rollbacks",
        *_activity_lines(journal.get("rollbacks", [])),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        journal = json.load(f)
    if sys.argv[2:] == ["--outcome"]:
        print(outcome(journal))
    else:
        print(summarize(journal))
