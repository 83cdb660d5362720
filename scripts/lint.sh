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
