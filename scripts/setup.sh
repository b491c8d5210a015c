#!/usr/bin/env bash
# Installs everything the MEP and its tests need on a fresh Debian machine, as root.
# Idempotent: a second run only checks. MEP_VENV overrides the venv location.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MEP_VENV:-/opt/mep/venv}
UEP_VENV=${MEP_UEP_VENV:-/opt/mep/uep-venv}
UEP_VERSION=4.19.0  # the pinned globus-compute-endpoint that user endpoints run
say() { printf '[setup] %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh must run as root: it installs packages, and the helper and its tests need root." >&2
  exit 1
fi

# Debian packages: the interpreter the helper runs on (outside /root, so users can reach
# the UEP interpreter), PAM modules the tests use, runuser/setpriv, systemd tools for
# socket activation and unit checks, RabbitMQ for the broker, strace (a lifetime test holds
# a process inside a system call with it). Versions are those of the Debian release's
# package set (bookworm: Slurm 22.05.8, munge 0.5.15).
pkgs=(python3 python3-venv libpam0g libpam-modules libpam-runtime passwd util-linux systemd rabbitmq-server procps strace
      gcc libc6-dev sudo  # these three for bench/: the static probe, and sudo as a baseline
      slurmctld slurmd slurm-client munge)  # a single-node Slurm cluster for the batch tests (tests/rigs/slurm.py)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's munge and Slurm packages start their daemons through systemd where it runs; the
# tests start their own, with their own key and config in a temporary directory
# (tests/rigs/slurm.py), so nothing here configures Slurm.

if ! rabbitmqctl -q status >/dev/null 2>&1 && rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
  # up but sick: `status` fails when a part of the node died (seen: its memory monitor, of
  # EMFILE, after 1,000 connections at once); restarting the RabbitMQ application restores it
  say "RabbitMQ answers but its status fails: restarting the RabbitMQ application"
  rabbitmqctl -q stop_app && rabbitmqctl -q start_app
fi
if ! rabbitmqctl -q status >/dev/null 2>&1; then
  say "starting RabbitMQ"
  rabbitmq-server -detached
  for _ in $(seq 60); do rabbitmqctl -q status >/dev/null 2>&1 && break; sleep 1; done
  rabbitmqctl -q status >/dev/null 2>&1 || { echo "RabbitMQ did not start; see /var/log/rabbitmq" >&2; exit 1; }
fi

# The local compute service creates per-endpoint RabbitMQ accounts through this API.
if ! rabbitmq-plugins is_enabled rabbitmq_management >/dev/null 2>&1; then
  say "enabling RabbitMQ's management API (for the local compute service)"
  rabbitmq-plugins enable -q rabbitmq_management >/dev/null
fi
for _ in $(seq 30); do rabbitmqctl -q status >/dev/null 2>&1 && rabbitmq-diagnostics -q check_port_listener 15672 \
  >/dev/null 2>&1 && break; sleep 1; done

if [ ! -x "$VENV/bin/python3" ]; then
  say "creating $VENV from /usr/bin/python3"
  mkdir -p "$(dirname "$VENV")"
  /usr/bin/python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip==24.3.1
fi
# A regular (not editable) install: the code the root helper runs then lives in a
# root-owned, read-only tree under the venv, whatever directory this checkout is in,
# and the broker and UEP accounts can read it.
say "installing the project into $VENV"
rm -rf build  # a stale build/lib would install modules that no longer exist
"$VENV/bin/pip" install -q --disable-pip-version-check --no-warn-script-location ".[test,service,bench]"
# setuptools' distutils-precedence.pth would import _distutils_hack into every
# interpreter of this venv, the root helper's included: keep it out.
if "$VENV/bin/python3" -c 'import importlib.util,sys; sys.exit(importlib.util.find_spec("setuptools") is None)'; then
  "$VENV/bin/pip" uninstall -q -y setuptools
fi
# The user endpoint program: the real globus-compute-endpoint, in its own root-owned venv
# on /usr/bin/python3 (every user can run it; nothing under /root).
if [ "$("$UEP_VENV/bin/python3" -c 'import importlib.metadata as m; print(m.version("globus-compute-endpoint"))' \
      2>/dev/null)" != "$UEP_VERSION" ]; then
  say "installing globus-compute-endpoint==$UEP_VERSION into $UEP_VENV"
  rm -rf "$UEP_VENV"
  /usr/bin/python3 -m venv "$UEP_VENV"
  "$UEP_VENV/bin/pip" install -q --disable-pip-version-check "globus-compute-endpoint==$UEP_VERSION"
fi
install -o root -g root -m 0755 scripts/uep-start.sh "$UEP_VENV/bin/mep-uep-start"
# mepctl on root's PATH (not upstream's globus-compute-endpoint, whose `start` would run
# upstream's all-root MEP)
ln -sfn "$VENV/bin/mepctl" /usr/local/sbin/mepctl
chmod -R go-w,a+rX "$VENV" "$UEP_VENV"
say "ready: $VENV, $UEP_VENV"
