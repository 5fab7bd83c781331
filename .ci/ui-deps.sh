#!/usr/bin/env bash
# What the browser UI tests (tests/test_webui_*.py) need: Debian's Chromium and the Playwright
# client library. Never `playwright install`: it downloads its own browser, which fails offline;
# the tests launch /usr/bin/chromium instead. Run inside the test virtual environment.
set -euo pipefail

PLAYWRIGHT_VERSION="1.65.2"

if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends chromium
fi
python -m pip install -q "playwright==${PLAYWRIGHT_VERSION}"
