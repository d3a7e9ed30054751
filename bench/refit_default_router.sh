#!/usr/bin/env bash
# Rebuild the router crecli ships (src/crecli/routers/default.cre), used by `cre ask`,
# `cre batch`, `cre serve` and `cre eval` when no --router is given and no default is set.
#
# Fitted and calibrated as README's headline is measured: examples/querylog-large.jsonl
# (1,400 BIG-bench queries, 16 tasks) on the default ladder, one vote a query (cre fit's
# default), then the deferral check tuned held out (cre calibrate's default), budget: keep
# 98% of the strongest model's accuracy. Run it again when the ladder or a model changes.
#
# It runs every model on every query the outcome store lacks (about 30 min on a 2-core
# AMD EPYC, 1-2 h on an AMX Xeon, the first time); a re-run with the store full takes a
# minute. Needs `cre models pull` and `cre models bench` first.
set -euo pipefail
cd "$(dirname "$0")/.."
out=src/crecli/routers/default.cre
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The log given relatively, so the router records it relative to itself (../../../examples/...):
# found in any clone, by `cre calibrate` and by `cre eval`'s count of queries it was fitted on.
cre fit examples/querylog-large.jsonl -o "$work/fitted.cre" --truth-field meta.source --seed 0
cre calibrate "$work/fitted.cre" -o "$out" --seed 0   # atomic: a temp file, then a rename
cre inspect "$out" >&2
ls -l "$out" >&2
