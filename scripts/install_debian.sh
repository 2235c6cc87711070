#!/usr/bin/env bash
# Debian packages the project needs beyond Python, installed only where a command they provide is missing:
#   bash scripts/install_debian.sh COMMAND[,COMMAND...] PACKAGE...
# `make install` uses it for bubblewrap (bwrap: the jail's sandbox, docs/security.md) and Chromium with its
# WebDriver (the dashboard's browser test). Idempotent. Run as root (CI is) or with sudo.
set -euo pipefail

commands="$1"
shift
missing=""
for command in ${commands//,/ }; do
    command -v "$command" >/dev/null 2>&1 || missing="$missing $command"
done
if [ -z "$missing" ]; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "install_debian: $* needed ($missing missing): run as root (or install sudo)" >&2; exit 1; }
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq "$@"
