#!/usr/bin/env bash
# Makes sure the services and tools the test suite needs are on this machine: PostgreSQL on
# 127.0.0.1:5432 (database `test`), starting a local cluster if one is installed but
# stopped; Redis on 127.0.0.1:6379 (the Redis state backend's tests), installing and starting
# it if nothing answers there; `ip` and `nft`, with which the sandbox gives outbound functions
# their network; CRIU 4, with which templates are checkpointed to disk (the snapshot tests use
# it); Node.js 20 or newer (the nodejs20 runtime's tests), checked, not installed;
# schemathesis and openapi-spec-validator (the OpenAPI tests), in a virtualenv under target/.
set -euo pipefail

pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }

for tool in ip:iproute2 nft:nftables; do
  if ! command -v "${tool%%:*}" >/dev/null 2>&1; then
    echo "ensure-services: ${tool%%:*} not found; installing ${tool#*:}" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${tool#*:}" >/dev/null
  fi
done

"$(dirname "$0")/install-criu.sh" >&2

# The nodejs20 runtime's tests need Node.js 20 or newer (Debian bookworm's own nodejs is 18,
# too old): say so plainly rather than fail deep in a test.
node_major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
if [ "$node_major" -lt 20 ]; then
  echo "ensure-services: Node.js 20 or newer is required (found: $(node --version 2>/dev/null || echo none)); install it from NodeSource or your distribution" >&2
  exit 1
fi

if ! command -v pg_isready >/dev/null 2>&1; then
  echo "ensure-services: PostgreSQL client tools not found; installing postgresql" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi

if ! pg_up; then
  echo "ensure-services: starting PostgreSQL" >&2
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  for _ in $(seq 1 30); do pg_up && break; sleep 1; done
fi
pg_up || { echo "ensure-services: PostgreSQL is not reachable on 127.0.0.1:5432" >&2; exit 1; }

# The tests connect as postgres to database `test` with trust auth on the loopback address.
if ! psql -h 127.0.0.1 -U postgres -d test -Atc 'select 1' >/dev/null 2>&1; then
  su postgres -c "psql -Atc 'create database test'" >/dev/null 2>&1 || true
fi
psql -h 127.0.0.1 -U postgres -d test -Atc 'select 1' >/dev/null
echo "ensure-services: PostgreSQL ready" >&2

redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }

if ! redis_up; then
  if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    echo "ensure-services: Redis not found; installing redis-server" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  fi
  if ! redis_up; then
    echo "ensure-services: starting Redis" >&2
    # Nothing on disk: the tests' data is throwaway.
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
    for _ in $(seq 1 30); do redis_up && break; sleep 1; done
  fi
fi
redis_up || { echo "ensure-services: Redis is not reachable on 127.0.0.1:6379" >&2; exit 1; }
echo "ensure-services: Redis ready" >&2

# The OpenAPI tests (crates/nimbus/tests/openapi_fuzz.rs) run schemathesis and
# openapi-spec-validator from a virtualenv of their own, installed from PyPI through pip's own
# configuration by the real interpreter (not a version manager's shim on PATH).
fuzz_tools="schemathesis==4.32.5 openapi-spec-validator==0.9.0"
venv="$(cd "$(dirname "$0")/.." && pwd)/target/schemathesis"
if [ "$(cat "$venv/installed" 2>/dev/null)" != "$fuzz_tools" ]; then
  echo "ensure-services: installing $fuzz_tools into $venv" >&2
  if ! /usr/bin/python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
  fi
  rm -rf "$venv"
  /usr/bin/python3 -m venv "$venv"
  # shellcheck disable=SC2086 # one requirement per word
  "$venv/bin/pip" install -q $fuzz_tools
  echo "$fuzz_tools" >"$venv/installed"
fi
echo "ensure-services: schemathesis ready" >&2
