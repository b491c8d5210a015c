#!/usr/bin/env bash
# The foundation demo: `mepctl start` runs the root helper, which starts a small broker as
# an unprivileged account; the broker asks the helper to spawn a probe as two demo users
# (and as root, which must be refused), and prints what each probe saw from the inside.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${MEP_VENV:-/opt/mep/venv}
ETC=/etc/mep-demo
say() { printf '[demo] %s\n' "$*"; }

for u in mep-demo-alice mep-demo-bob; do
  id "$u" >/dev/null 2>&1 || { useradd --create-home --shell /bin/bash "$u"; say "created user $u"; }
done
getent group mep-demo-science >/dev/null || groupadd mep-demo-science
usermod -aG mep-demo-science mep-demo-bob
id mep-demo-broker >/dev/null 2>&1 || { useradd --system --no-create-home --shell /usr/sbin/nologin mep-demo-broker; say "created broker account mep-demo-broker"; }

install -d -o root -g root -m 0755 "$ETC"
install -o root -g root -m 0755 scripts/probe.py "$ETC/probe"
if [ ! -s "$ETC/key" ]; then
  umask 077; head -c 32 /dev/urandom > "$ETC/key"; umask 022
fi
chown root:mep-demo-broker "$ETC/key"; chmod 0640 "$ETC/key"
cat > "$ETC/policy.toml" <<TOML
# helper policy of the demo (see docs/policy.md)
broker_user = "mep-demo-broker"
key_file = "$ETC/key"
uep_argv = ["$ETC/probe", "start", "{name}"]
broker_argv = ["$VENV/bin/python3", "-I", "-m", "broker.spawn_demo", "--key", "$ETC/key",
               "--user", "mep-demo-alice", "--user", "mep-demo-bob", "--user", "root"]
min_uid = 1000
TOML
chmod 0644 "$ETC/policy.toml"

say "mepctl start --policy $ETC/policy.toml"
"$VENV/bin/mepctl" start --policy "$ETC/policy.toml"
left=$(pgrep -u mep-demo-alice,mep-demo-bob -c || true)
say "processes left running as the demo users: ${left}"
[ "$left" = 0 ]
