#!/usr/bin/env bash
# The test command of README.md: fetch the real small models and data (pinned, checksummed), then run every
# test of the workspace. FEDSB_REQUIRE_ASSETS=1 turns "assets missing, skipped" into a failure.
# Tests that cannot run their check write a `SKIPPED:` line to $FEDSB_SKIP_LOG; unless the caller set it
# (.ci/run does, and counts them itself), this script collects them and prints them at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${FEDSB_SKIP_LOG:-}" ]; then
  FEDSB_SKIP_LOG="$(mktemp "${TMPDIR:-/tmp}/fedsb-test-skips.XXXXXX")"
  export FEDSB_SKIP_LOG
  report_skips() {
    local rc=$?
    if [ -s "$FEDSB_SKIP_LOG" ]; then
      printf '\n%s checks SKIPPED:\n' "$(grep -c '^SKIPPED:' "$FEDSB_SKIP_LOG" || true)" >&2
      sed 's/^/  /' "$FEDSB_SKIP_LOG" >&2
    fi
    rm -f "$FEDSB_SKIP_LOG"
    exit "$rc"
  }
  trap report_skips EXIT
fi
bash scripts/fetch-assets.sh
FEDSB_REQUIRE_ASSETS=1 cargo test --workspace --locked "$@"
