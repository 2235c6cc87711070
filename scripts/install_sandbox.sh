#!/usr/bin/env bash
# bubblewrap (bwrap), the sandbox every foreign model's jailed child starts in (jail/bwrap.py), from Debian's
# packages. Without it no uploaded TorchScript or ONNX model runs (jail_unavailable). Idempotent; run as root
# (CI is) or with sudo.
set -euo pipefail

if command -v bwrap >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "install_sandbox: run as root (or install sudo), or install bubblewrap" >&2; exit 1; }
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq bubblewrap
