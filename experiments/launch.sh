#!/usr/bin/env bash
# One study end to end: `chaincomp <command> experiment=<experiment>` (run or sweep), then
# `chaincomp report experiment=<experiment>`, with the same extra overrides for both.
#
#   experiments/launch.sh <run|sweep> <experiment> [override ...]
#
# The studies' launch_gpu.sh scripts call this. CHAINCOMP names the CLI (default: chaincomp;
# e.g. CHAINCOMP="python -m chaincomp" without an installed script).
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 <run|sweep> <experiment> [override ...]" >&2; exit 2; }
command=$1 experiment=$2
shift 2
cd "$(dirname "$0")/.."
CHAINCOMP=${CHAINCOMP:-chaincomp}
start=$(date +%s)
$CHAINCOMP "$command" "experiment=$experiment" "$@"
echo "$command $experiment: $(( $(date +%s) - start )) s"
$CHAINCOMP report "experiment=$experiment" "$@"
