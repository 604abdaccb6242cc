#!/usr/bin/env bash
# The project's test command: install with the test extras at the tested versions (constraints.txt), make sure headless Chromium exists for the report's
# browser test (installed with apt-get when run as root), then run pytest, one worker per core, with any arguments given.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install -q -c constraints.txt -e ".[test]"

have_chromium() { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; }

if ! have_chromium; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium for the report's browser test (apt-get)..." >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >&2 || true
  fi
  if ! have_chromium; then
    if [ -n "${CI:-}" ]; then
      echo "error: no chromium binary and it could not be installed; CI needs the report's browser test" >&2
      exit 1
    fi
    echo "note: no chromium binary, and it could not be installed (needs root and apt-get); the report's browser test will be skipped" >&2
  fi
fi

exec python3 -m pytest -q -n auto "$@"  # one worker per core (-n 0 runs serially)
