#!/bin/sh
# The user endpoint launcher: the program the helper policy names as the UEP. It runs as
# the mapped user, after the helper has dropped every privilege, and does what upstream's
# MEP does just before exec: create the UEP's directory (~/.globus_compute/NAME, mode
# 0700) and send stdout/stderr to its endpoint.log (0600, appended). Then it execs the
# pinned globus-compute-endpoint with the same arguments (`_start-user-endpoint NAME`);
# stdin (the start document), fd 3 (credentials) and fd 4 (audit) pass through untouched.
# NAME was checked by the helper (no '/', no '..'). Installed by scripts/setup.sh.
set -eu
umask 077
# The PATH we were given is the site's (user_environment.yaml may set it, as the seed's
# wrapper trick does: `PATH: /usr/local/admin_scripts/`): it chooses the UEP program below
# and is the UEP's. This script's own tools come from the system's directories.
site_path=${PATH:-}
PATH=/usr/bin:/bin
export PATH
[ "$#" -ge 2 ] || { echo "usage: $0 _start-user-endpoint NAME" >&2; exit 64; }
here=$(dirname "$0")
dir="${GLOBUS_COMPUTE_USER_DIR:-$HOME/.globus_compute}/$2"
mkdir -p "$dir"
export GLOBUS_COMPUTE_ENDPOINT_DIR="$dir" GLOBUS_COMPUTE_LOG_PATH="$dir/endpoint.log"  # as upstream's ensure_paths()
# A pid file left by a UEP that was killed (SIGKILL leaves it behind) would make the new
# one refuse to start for heartbeat_period * 3; a pid file whose process is gone is stale.
pidfile="$dir/daemon.pid"
if [ -f "$pidfile" ]; then
  pid=$(head -c 32 "$pidfile" | tr -cd 0-9)
  if [ -n "$pid" ] && [ ! -d "/proc/$pid" ]; then rm -f "$pidfile"; fi
fi
cd "$HOME" 2>/dev/null || cd /
exec >>"$dir/endpoint.log" 2>&1
# Batch jobs (broker/batch_cleanup.py, docs/decisions.md): every Slurm job this UEP submits
# is named by this tag (sbatch reads SBATCH_JOB_NAME; it overrides the script's
# --job-name). When the UEP has ended, the broker starts this launcher once more, as the
# same user, with MEP_UEP_CLEANUP set to the pid of the UEP that ended; it then cancels
# that UEP's jobs, as the user, and starts no endpoint.
if [ -n "${MEP_UEP_CLEANUP:-}" ]; then
  pid=$(printf %s "$MEP_UEP_CLEANUP" | tr -cd 0-9)
  [ -n "$pid" ] || { echo "mep-uep-start: MEP_UEP_CLEANUP is not a pid" >&2; exit 64; }
  command -v scancel >/dev/null 2>&1 || exit 0  # no Slurm here: no job to cancel
  echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) mep-uep-start: the user endpoint (pid $pid) has ended;" \
       "cancelling its Slurm jobs (job name gc-uep.$pid.$2)"
  exec timeout 60 scancel --user="$(id -un)" --jobname="gc-uep.$pid.$2"
fi
SBATCH_JOB_NAME="gc-uep.$$.$2"
export SBATCH_JOB_NAME
# `debug: true` in the rendered config: the config between the seed's sentinel lines, in
# this endpoint.log, where the seed's `sed -n "/Begin Compute/,/End Compute/p"` looks.
# pread leaves stdin's offset where the UEP expects it.
"$here/python3" -I -c '
import json, os, sys, time, yaml
config = json.loads(os.pread(0, 1 << 20, 0) or b"{}").get("config") or ""
if "debug" in config and (yaml.safe_load(config) or {}).get("debug") is True:
    lines = config.splitlines()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"{stamp} DEBUG mep-uep-start Begin Compute endpoint configuration ({len(lines)} lines):")
    print("".join(f"   {line}\n" for line in lines) + "End Compute endpoint configuration", flush=True)
' || true
# The UEP program: a site's own globus-compute-endpoint on the site's PATH (the seed's
# wrapper trick), else the pinned one. Parsl's GlobusComputeEngine finds
# process_worker_pool.py in this venv by name, so it is on the UEP's PATH too.
program=$(PATH=$site_path command -v globus-compute-endpoint 2>/dev/null || true)
case "$program" in /*) ;; *) program="$here/globus-compute-endpoint" ;; esac
PATH="${site_path:+$site_path:}$here:/usr/bin:/bin"
export PATH
exec "$program" "$@"
