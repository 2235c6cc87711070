#!/usr/bin/env bash
# Headless Chromium and its WebDriver for tests/e2e/test_dashboard.py, from Debian's packages.
# Idempotent: does nothing when both are already installed. Run as root (CI is) or with sudo.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    echo "install_browser: chromium and chromedriver already installed ($(chromium --version 2>/dev/null | head -1))"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "install_browser: run as root (or install sudo)" >&2; exit 1; }
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# The two packages come from the same source, so the driver matches the browser's version.
$SUDO apt-get install -y -qq chromium chromium-driver
chromium --version
chromedriver --version
