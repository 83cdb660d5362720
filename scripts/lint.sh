#!/usr/bin/env bash
# The checks .ci/run makes before the tests: layer contracts, lint, format, types.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "==> layer contracts (import-linter)"
.venv/bin/lint-imports
echo "==> ruff check"
.venv/bin/ruff check .
echo "==> ruff format --check"
.venv/bin/ruff format --check .
echo "==> mypy"
.venv/bin/mypy
echo "==> promtool: the alert rules, their tests, and our metrics' exposition"
promtool check rules docs/prometheus-alerts.yml
promtool test rules tests/data/prometheus-alerts-test.yml
.venv/bin/libvirt-executor metrics | promtool check metrics
