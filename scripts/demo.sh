#!/usr/bin/env bash
# The end-to-end demo, as root on one machine with no Globus cloud: a local stand-in for
# the Globus Compute web service, a MEP configured with `mepctl configure` and started
# with `mepctl start` (root helper + unprivileged broker), and the real SDK submitting as
# two Globus identities that map to two POSIX users, then as a function the endpoint
# does not allow, as an identity its authentication policy excludes (the policy made by
# `mepctl configure --excluded-domains` through globus-sdk's AuthClient) and as an
# identity it does not map. Everything is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '\n[demo] %s\n' "$*"; }
say "setting up this machine (scripts/setup.sh)"
bash scripts/setup.sh
VENV=${MEP_VENV:-/opt/mep/venv}
PY="$VENV/bin/python3"
MEPCTL="$VENV/bin/mepctl"
ROOT=/etc/mep-demo
NAME=demo
RUN=$(mktemp -d /run/mep-demo.XXXXXX)
chmod 0755 "$RUN"
SERVICE_PID=
cleanup() {
  "$MEPCTL" stop "$NAME" --config-root "$ROOT" >/dev/null 2>&1 || true
  [ -n "${MEP_PID:-}" ] && { wait "$MEP_PID" 2>/dev/null || true; }
  [ -n "$SERVICE_PID" ] && { kill "$SERVICE_PID" 2>/dev/null; wait "$SERVICE_PID" 2>/dev/null || true; }
}
trap cleanup EXIT

say "creating the demo users mep-demo-alice and mep-demo-bob"
for u in mep-demo-alice mep-demo-bob; do id "$u" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$u"; done
pgrep -f "localservice.*--port 5000" >/dev/null && { echo "a local service already listens on :5000; stop it first" >&2; exit 1; }

say "starting the local compute service on http://localhost:5000 (bearer tokens stand in for Globus Auth)"
tok() { head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
ALICE=$(tok) BOB=$(tok) EVE=$(tok) MALLORY=$(tok) ADMIN=$(tok)
ADMIN_CLIENT=$("$PY" -c "import uuid; print(uuid.uuid4())") ADMIN_SECRET=$(tok)
ident() {
  local id
  id=$("$PY" -c "import uuid,sys; print(uuid.uuid5(uuid.NAMESPACE_DNS, sys.argv[1]))" "$1")
  printf '[{"id": "%s", "sub": "%s", "username": "%s", "name": "%s", "identity_provider": "%s", "status": "used"}]' \
    "$id" "$id" "$1" "${1%@*}" "00000000-0000-0000-0000-000000000007"
}
cat > "$RUN/identities.json" <<JSON
{"tokens": {"$ALICE": $(ident alice@demo.example), "$BOB": $(ident bob@demo.example),
            "$EVE": $(ident eve@elsewhere.example), "$MALLORY": $(ident mallory@excluded.example),
            "$ADMIN": $(ident admin@demo.example)},
 "clients": {"$ADMIN_CLIENT": {"secret": "$ADMIN_SECRET"}}}
JSON
"$PY" -I -m localservice --identities "$RUN/identities.json" --state "$RUN/service-state.json" --purge-on-exit \
  >"$RUN/service.log" 2>&1 &
SERVICE_PID=$!
for _ in $(seq 50); do grep -q "local compute service on" "$RUN/service.log" 2>/dev/null && break; sleep 0.2; done
grep -q "local compute service on" "$RUN/service.log" || { cat "$RUN/service.log"; exit 1; }

say "alice registers three functions with the SDK"
FUNCS=$(GC_TOKEN=$ALICE "$PY" scripts/demo_user.py register)
echo "    $FUNCS"
field() { "$PY" -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$FUNCS" "$1"; }

# The administrator's Globus identity for configure: a client of the local Globus Auth
# (upstream's variables), that Auth selected as a user selects a non-production one.
export GLOBUS_COMPUTE_CLIENT_ID=$ADMIN_CLIENT GLOBUS_COMPUTE_CLIENT_SECRET=$ADMIN_SECRET
export GLOBUS_SDK_SERVICE_URL_AUTH=http://127.0.0.1:5000/
PROJECT=$("$PY" -c "
import os, globus_sdk
app = globus_sdk.ClientApp('demo', client_id=os.environ['GLOBUS_COMPUTE_CLIENT_ID'],
                           client_secret=os.environ['GLOBUS_COMPUTE_CLIENT_SECRET'],
                           config=globus_sdk.GlobusAppConfig(token_storage='memory'))
ac = globus_sdk.AuthClient(app=app, app_scopes=[globus_sdk.scopes.AuthScopes.manage_projects])
print(ac.create_project('MEP demo', contact_email='admin@demo.example')['project']['id'])")
say "mepctl configure --multi-user $NAME (only whoami and busy_thread are allowed; a new policy excludes excluded.example)"
rm -rf "${ROOT:?}/$NAME"
"$MEPCTL" configure --multi-user "$NAME" --config-root "$ROOT" --broker-user mep-demo-broker \
  --display-name "MEP demo" --allowed-function "$(field whoami)" --allowed-function "$(field busy_thread)" \
  --auth-policy-project-id "$PROJECT" --auth-policy-display-name "MEP demo policy" \
  --excluded-domains "excluded.example" | sed 's/^/    /'
unset GLOBUS_COMPUTE_CLIENT_ID GLOBUS_COMPUTE_CLIENT_SECRET GLOBUS_SDK_SERVICE_URL_AUTH
CONF="$ROOT/$NAME"
cat > "$CONF/example_identity_mapping_config.json" <<'JSON'
[{"DATA_TYPE": "expression_identity_mapping#1.0.0",
  "mappings": [{"source": "{username}", "match": "(.*)@demo\\.example", "output": "mep-demo-{0}"}]}]
JSON
printf '%s' "$ADMIN" > "$CONF/service.token"
chown root:mep-demo-broker "$CONF/service.token"; chmod 0640 "$CONF/service.token"
# The local service's RabbitMQ listens on 5672 (plain AMQP on the loopback), not 443.
sed -i 's/^amqp_port: 443$/amqp_port: 5672/' "$CONF/config.yaml"
cat >> "$CONF/config.yaml" <<YAML

# The demo registers with the local compute service (not the Globus cloud).
compute_service_url: http://127.0.0.1:5000
compute_service_token_file: $CONF/service.token
YAML
echo "    identity mapping: <name>@demo.example -> mep-demo-<name>"

say "mepctl start $NAME (root helper; broker as mep-demo-broker)"
"$MEPCTL" start "$NAME" --config-root "$ROOT" >"$RUN/mep.log" 2>&1 &
MEP_PID=$!
for _ in $(seq 100); do "$MEPCTL" status "$NAME" --config-root "$ROOT" >/dev/null 2>&1 && break; sleep 0.2; done
"$MEPCTL" status "$NAME" --config-root "$ROOT" | sed 's/^/    /'
EID=$("$MEPCTL" status "$NAME" --config-root "$ROOT" --json | "$PY" -c "import json,sys; print(json.load(sys.stdin)['endpoint_id'])")

say "alice@demo.example submits (user_endpoint_config max_workers=3)"
GC_TOKEN=$ALICE "$PY" scripts/demo_user.py run "$EID" "$FUNCS" 3
say "bob@demo.example submits (user_endpoint_config max_workers=2)"
GC_TOKEN=$BOB "$PY" scripts/demo_user.py run "$EID" "$FUNCS" 2
say "alice submits a function that is not on the endpoint's allow list"
GC_TOKEN=$ALICE "$PY" scripts/demo_user.py refused "$EID" "$FUNCS"
say "mallory@excluded.example (a domain the endpoint's authentication policy excludes) submits"
GC_TOKEN=$MALLORY "$PY" scripts/demo_user.py policy "$EID" "$FUNCS"
say "eve@elsewhere.example (no identity mapping) submits"
GC_TOKEN=$EVE "$PY" scripts/demo_user.py unmapped "$EID" "$FUNCS"

say "mepctl list $NAME"
"$MEPCTL" list "$NAME" --config-root "$ROOT" | sed 's/^/    /'
say "mepctl stop $NAME"
"$MEPCTL" stop "$NAME" --config-root "$ROOT" | sed 's/^/    /'
wait "$MEP_PID" || true
MEP_PID=
for _ in $(seq 50); do pgrep -u mep-demo-alice,mep-demo-bob >/dev/null || break; sleep 0.2; done
left=$(pgrep -u mep-demo-alice,mep-demo-bob -c || true)
say "processes left running as the demo users: $left"
[ "$left" = 0 ]
say "done. Logs: $CONF/endpoint.log (broker), $RUN/mep.log (helper), ~mep-demo-*/.globus_compute/*/endpoint.log (UEPs)"
