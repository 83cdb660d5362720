"""docs/prometheus-alerts.yml and docs/grafana-dashboard.json against the real promtool and the
metrics we export: the rules parse, fire on the series they are for (tests/data), and every
metric either file uses is one `libvirt-executor metrics` has."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from executor.admin.observe import families
from executor.core.settings import MirrorSettings

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "docs" / "prometheus-alerts.yml"
RULES_TEST = ROOT / "tests" / "data" / "prometheus-alerts-test.yml"
DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"
NAME = re.compile(r"\blibvirt_executor_[a-z_]+")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        pytest.fail("promtool is missing: scripts/setup.sh installs it (Debian's prometheus package)")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120)


def test_the_alert_rules_pass_promtools_check_and_their_unit_tests():
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", str(RULES_TEST))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def _exported(tmp_settings) -> set[str]:
    # The mirror "enabled" on loopback where nothing listens: its families, without a probe off this host.
    settings = dataclasses.replace(
        tmp_settings,
        libvirt=dataclasses.replace(tmp_settings.libvirt, subnet="127.0.0.0/24"),
        mirror=MirrorSettings(enabled=True, port=1, storage=tmp_settings.mirror.storage),
    )
    return {"libvirt_executor_" + f.name for f in families(settings, agent_status=dict)}


def _used(text: str) -> set[str]:
    return {re.sub(r"_(bucket|count|sum)$", "", name) for name in NAME.findall(text)}


def test_the_rules_and_the_dashboard_use_only_metrics_we_export(tmp_settings):
    exported = _exported(tmp_settings)
    exprs = [t["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"] for t in panel["targets"]]
    assert _used(RULES.read_text()) - exported == set()
    assert _used("\n".join(exprs)) - exported == set()
    assert len(exprs) >= 15


def test_every_alert_has_a_runbook_section_in_the_admin_guide():
    admin = (ROOT / "docs" / "admin.md").read_text()
    for alert in re.findall(r"alert: (\w+)", RULES.read_text()):
        assert f"### {alert}" in admin, alert
