#!/usr/bin/env bash
# Prepares and sizes what one device call carries for tools/gpu/check.sh, against the device
# tool's 64 MiB limit on everything that travels (the tracked tree, untracked files git does not
# ignore, and the carried paths):
#
#   tools/gpu/payload.sh          # fetch the wheels into .whl, then size tree + easel.xz + .whl
#   tools/gpu/payload.sh --tree   # only the tree, against its share (CI runs this)
#
# The tree's share is what is left after the packed CUDA binary (24.4 MiB on 2026-11-30) and the
# wheels (3.9 MiB: diffusers, which the device image lacks; its transformers 5.x and PyTorch
# serve), less 0.2 MiB for the binary to grow: 35.5 MiB.
# When it passes, the device call is:
#   run(command="bash tools/gpu/check.sh 2>&1 | tee $OUT/check.log", carry=["target/gpu/easel.xz", ".whl"], timeout_s=580)
set -euo pipefail
cd "$(dirname "$0")/../.."

limit=$((64 * 1024 * 1024))
tree_share=$((355 * 1024 * 1024 / 10))
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
# A symbolic link travels as a link (the device README), so it counts as its own few bytes.
tree_bytes() {
  git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{ s += $1 } END { print s + 0 }'
}

tree=$(tree_bytes)
echo "tree (tracked and untracked-not-ignored): $(mib "$tree") of its $(mib $tree_share) share"
if [ "${1:-}" = --tree ]; then
  [ "$tree" -le "$tree_share" ] || { echo "the tree is over its share: a device call could not carry the CUDA binary with it (shrink fixtures; tools/fixtures/clip_tokenizer.py says how they were cut)" >&2; exit 1; }
  exit 0
fi

mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "diffusers==0.35.2"
[ -f target/gpu/easel.xz ] || { echo "no target/gpu/easel.xz: run tools/gpu/build.sh first" >&2; exit 2; }
binary=$(stat -c %s target/gpu/easel.xz)
wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
total=$((tree + binary + wheels))
echo "easel.xz $(mib "$binary"), .whl $(mib "$wheels"): $(mib "$total") of $(mib $limit)"
[ "$total" -le "$limit" ] || { echo "over the device tool's limit" >&2; exit 1; }
echo 'device call: run(command="bash tools/gpu/check.sh 2>&1 | tee $OUT/check.log", carry=["target/gpu/easel.xz", ".whl"], timeout_s=580)'
