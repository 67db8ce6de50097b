#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment in .venv with geovote and its test tools.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch 2.14.1 with torchvision 0.29.1: the pair that installs and imports together on this project's
# machines (torch 2.13 with PyPI's torchvision fails to import). Elsewhere any torch >= 2.1 works.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[dev]"
# The web app's browser test drives Debian's Chromium through Playwright. Install it where we can
# (root with apt, as on CI); elsewhere that one test is skipped and says why.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "setup: could not install chromium; the browser test will be skipped" >&2
fi
