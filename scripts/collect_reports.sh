#!/usr/bin/env bash
# Copy the small result files (summary.json, summary.md, plots, config) of every run under RESULTS_DIR
# into reports/results/ so they can be committed (per-case files stay out of git).
set -eu
R=${1:-results}
for d in "$R"/*/; do
  name=$(basename "$d")
  mkdir -p "reports/results/$name"
  for f in summary.json summary.md config.yaml "$d"*.png; do
    f=$(basename "$f")
    [ -f "$d$f" ] && cp "$d$f" "reports/results/$name/"
  done
done
ls reports/results
