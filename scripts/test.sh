#!/usr/bin/env bash
# Install (idempotent) and run the whole test suite: lint, format check, pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
bash scripts/install_browser.sh || exit 1  # the `sanakit serve` tests drive a real browser
.venv/bin/ruff check . || exit 1
.venv/bin/ruff format --check . || exit 1
# two workers, one test file each at a time (module fixtures are built once per file)
.venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
