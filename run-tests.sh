#!/usr/bin/env bash
# dicomnode tests: lint, types, then the whole pytest suite (unit, integration with real peers, e2e).
# On a fresh clone it first runs the install part of ./setup.sh.
set -euo pipefail
cd "$(dirname "$0")"
if [[ ! -x .venv/bin/pytest || ! -f .venv/.dicomnode-installed || pyproject.toml -nt .venv/.dicomnode-installed \
      || ! -f .ohif/dist/index.html ]]; then
  ./setup.sh --no-demo
fi
export PATH="$PWD/.venv/bin:$PATH"
data="${DICOMNODE_TEST_DATA:-$PWD/../shared/data}"
if [[ ! -f "$data/README.md" ]]; then
  if [[ "${CI:-}" == "true" ]]; then echo "run-tests: shared test data missing at $data (required under CI)"; exit 1; fi
  echo "run-tests: shared test data missing at $data; tests that need it will skip"
fi
echo "== ruff"; ruff check dicomnode tests benchmarks; ruff format --check dicomnode tests benchmarks
echo "== mypy --strict"; mypy --strict dicomnode
echo "== pytest"
set +e
pytest "$@"
rc=$?
set -e
# pytest's exit 5 ("no tests collected") is a failure here: a suite that runs nothing proves nothing.
exit $rc
