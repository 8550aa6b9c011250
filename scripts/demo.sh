#!/usr/bin/env bash
# The demo: a lab with real Apache, a verifying client under load, the outcome.
# Extra arguments go to `coral demo` (see `coral demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/coral demo "$@"
