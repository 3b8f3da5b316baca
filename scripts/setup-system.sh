#!/usr/bin/env bash
# System packages the tests use: Debian's prometheus (prometheus + promtool).
set -euo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then exit 0; fi
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
# The package's service is not needed (tests start their own server on loopback).
pkill -x prometheus 2>/dev/null || true
command -v promtool
