#!/usr/bin/env bash
# Run the whole test suite: unit tests (no daemon) and vm tests (real libvirtd, qemu, the image).
# Sets the host up first (idempotent; quick once done). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --no-demo
exec .venv/bin/pytest "$@"
