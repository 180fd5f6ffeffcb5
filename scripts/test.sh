#!/usr/bin/env bash
# The test command of README.md: fetch the real small models and data (pinned, checksummed), then run every
# test of the workspace. FEDSB_REQUIRE_ASSETS=1 turns "assets missing, skipped" into a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-assets.sh
FEDSB_REQUIRE_ASSETS=1 cargo test --workspace --locked "$@"
