#!/bin/sh
# The shim's Expected Attention logits kernel against this CPU's FMA peak (see kernel_peak.c).
# Usage: sh scripts/kernel_peak.sh [N_CELLS]   (default 32768; needs gcc with OpenMP and F16C)
set -e
root="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# the shim's vector helpers and fused kernel, from its 8-wide helpers to its entry point
sed -n '/^\/\* 8-wide vectors/,/^int32_t llamakv_ea_logits/p' "$root/csrc/llamakv_shim.c" | sed '$d' > "$tmp/kernel.inc"
grep -q "static void ea_logits_fused" "$tmp/kernel.inc" || { echo "kernel_peak: the fused kernel was not found in csrc/llamakv_shim.c" >&2; exit 1; }
gcc -O3 -march=native -std=c11 -ffp-contract=fast -fopenmp -D_POSIX_C_SOURCE=200809L \
    -DKERNEL_INC="\"$tmp/kernel.inc\"" "$root/scripts/kernel_peak.c" -o "$tmp/kernel_peak" -lm
"$tmp/kernel_peak" "${1:-32768}"
