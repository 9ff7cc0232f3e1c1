#!/bin/bash
# Times configurations of one benchmark against each other in ONE device call, alternating them round by round
# (A1 B1 A2 B2 ...), so that the card's drift between calls does not enter the comparison (docs/benchmarks.md
# compares medians measured this way). Next to the binaries (and lib/), in a carried folder.
# Switches:
#   CONFIGS  ';'-separated "label=VAR=value VAR2=value ..." entries (a label alone: the environment as it is);
#            a variable BIN=path picks another binary for that entry (e.g. the previous build's, stripped beside
#            this one). Default: "new;old=SMA_CUDA_ATTN_WIDE=0".
#   CMD      the benchmark and its arguments (default: ./sma_bench_cuda_model 15 graph);
#   FILTER   a grep -E pattern of the output lines to keep (default: graph-step);
#   ROUNDS   rounds (default 2).
# Prints each kept line prefixed with "label round |"; writes the same to $OUT/ab.txt.
cd "$(dirname "$0")"
export OUT=${OUT:-/tmp/out}
export LD_LIBRARY_PATH="$PWD/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
mkdir -p "$OUT"
CONFIGS=${CONFIGS:-"new;old=SMA_CUDA_ATTN_WIDE=0"}
CMD=${CMD:-./sma_bench_cuda_model 15 graph}
FILTER=${FILTER:-graph-step}
ROUNDS=${ROUNDS:-2}
: > "$OUT/ab.txt"
IFS=';' read -r -a entries <<< "$CONFIGS"
for ((r = 1; r <= ROUNDS; ++r)); do
  for entry in "${entries[@]}"; do
    label=${entry%%=*}
    vars=""
    [ "$entry" != "$label" ] && vars=${entry#*=}
    read -r -a cmd <<< "$CMD"
    envs=()
    for v in $vars; do
      if [ "${v%%=*}" = BIN ]; then cmd[0]=${v#BIN=}; else envs+=("$v"); fi
    done
    env "${envs[@]}" timeout 120 "${cmd[@]}" 2>&1 | grep -E "$FILTER" | sed "s/^/$label $r | /" | tee -a "$OUT/ab.txt"
  done
done
