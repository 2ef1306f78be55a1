"""The Grafana dashboard (docs/grafana/amqprpc.json) asks only for metrics amqprpc exports,
with labels they have, and shows every one of them."""
from __future__ import annotations

import json
import pathlib
import re

from prometheus_client import Counter, Gauge, Histogram

from amqprpc.middleware import clientmetrics, metrics

DASHBOARD = pathlib.Path(__file__).resolve().parents[2] / "docs" / "grafana" / "amqprpc.json"
SUFFIXES = {Counter: ("_total", "_created"), Gauge: ("",), Histogram: ("_bucket", "_count", "_sum", "_created")}
SELECTOR = re.compile(r"\b(amqprpc_[a-z0-9_]+)\s*(\{[^}]*\})?")


def exported() -> dict[str, set[str]]:
    """Every series name the project's collectors export, with the labels it carries."""
    names = {}
    for module in (metrics, clientmetrics):
        for collector in vars(module).values():
            kind = type(collector)
            if kind not in SUFFIXES:
                continue
            labels = set(collector._labelnames) | ({"le"} if kind is Histogram else set())
            for suffix in SUFFIXES[kind]:
                names[collector._name + suffix] = labels
    # Read from worker stats at scrape time (metrics._StatsCollector): counters with a service label.
    for name, _ in (*metrics.STATS_COUNTERS.values(), *metrics.PARENT_COUNTERS.values()):
        names[name + "_total"] = {"service"}
    return names


def queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    found += [variable["definition"] for variable in dashboard["templating"]["list"] if "definition" in variable]
    return found


def test_every_query_names_metrics_amqprpc_exports_with_their_labels():
    names = exported()
    assert "amqprpc_client_duration_seconds_bucket" in names and "amqprpc_requests_total" in names
    problems = []
    for query in queries():
        used = SELECTOR.findall(query)
        if not used:
            problems.append(f"no amqprpc metric in {query!r}")
        for metric, selector in used:
            if metric not in names:
                problems.append(f"{metric} is not exported ({query!r})")
                continue
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector):
                if label not in names[metric]:
                    problems.append(f"{metric} has no label {label!r}")
        for group in re.findall(r"\bby\s*\(([^)]*)\)", query):
            metric_labels = set().union(*(names.get(metric, set()) for metric, _ in used))
            problems += [f"no metric of {query!r} has label {label!r}" for label in re.split(r"\s*,\s*", group.strip())
                         if label not in metric_labels]
    assert problems == []


def test_every_exported_metric_is_on_the_dashboard():
    used = {metric for query in queries() for metric, _ in SELECTOR.findall(query)}
    families = {re.sub(r"_(total|created|bucket|count|sum)$", "", name) for name in exported()}
    shown = {re.sub(r"_(total|created|bucket|count|sum)$", "", name) for name in used}
    assert families - shown == set()
