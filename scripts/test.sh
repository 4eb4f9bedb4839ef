#!/usr/bin/env bash
# The whole test suite: unit, store conformance (SQLite and PostgreSQL), runtime, engine
# and end-to-end tests against the real binary. Starts PostgreSQL first if it is stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-services.sh
cargo test --workspace --locked "$@"
