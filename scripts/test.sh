#!/usr/bin/env bash
# The functional test suite: lint, then every test (lab tests need root).
# Extra arguments go to pytest (e.g. scripts/test.sh -k lab -x).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check coral proxy tests scripts
.venv/bin/ruff format --check coral proxy tests scripts
.venv/bin/mypy coral proxy tests scripts
set +e
.venv/bin/pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "test: pytest collected no tests; that is a failure" >&2
    exit 1
fi
exit "$rc"
