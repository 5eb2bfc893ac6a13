#!/usr/bin/env bash
# The one prepared device check (docs/gpu.md holds its output, dated). On the GPU machine, after
# tools/gpu/build.sh here and with target/gpu/easel.xz (and .whl) carried:
#
#   tools/gpu/check.sh                        # CUDA: parity, then easel against PyTorch at real sizes
#   tools/gpu/check.sh --device cpu --tiny    # anywhere, with the CPU build and tiny models (CI runs this)
#
# (a) parity of the tiny SD 1.5, SD 2.1, SDXL and FLUX pipelines against the committed diffusers
#     references, in f32 (the CPU bounds), f16 and bf16 (bounds stated in `easel bench parity`);
# (b) easel against PyTorch/diffusers on the same device with random weights of the real sizes:
#     SDXL UNet step 1024x1024 batch 2 fp16, FLUX.1-dev transformer step 1024x1024 bf16, GGUF
#     q8_0/q4_k steps, VAE decode 1024x1024, and 28 steps end to end of a FLUX.1-dev-shaped
#     pipeline, with peak device memory (tools/gpu/vs_torch.py says what each side does).
# Budget on an H200: under 9 minutes.
set -uo pipefail
cd "$(dirname "$0")/../.."

device=cuda
tiny=""
easel=""
for arg in "$@"; do
  case "$arg" in
    --device) next=device ;;
    --tiny) tiny=--tiny ;;
    --easel) next=easel ;;
    *)
      case "${next:-}" in
        device) device="$arg" ;;
        easel) easel="$arg" ;;
        *) echo "usage: tools/gpu/check.sh [--device cuda|cpu] [--tiny] [--easel BIN]" >&2; exit 2 ;;
      esac
      next="" ;;
  esac
done
if [ -z "$easel" ]; then
  if [ "$device" = cpu ]; then easel=target/debug/easel; else easel=target/gpu/easel; fi
fi
# A device call carries target/gpu/easel.xz (the binary itself is over the carry limit).
if [ ! -x "$easel" ] && [ -f "$easel.xz" ]; then
  python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" "$easel.xz" "$easel" && chmod +x "$easel"
fi
[ -x "$easel" ] || { echo "no easel binary at $easel (tools/gpu/build.sh builds target/gpu/easel)" >&2; exit 2; }

if [ "${device%%:*}" = cuda ]; then
  # The CUDA libraries the binary links: the driver's, and PyTorch's nvidia wheels (or a CUDA install).
  nv=$(python3 -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'lib'))" 2>/dev/null || true)
  export LD_LIBRARY_PATH="${nv:+$nv:}/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
  # Any library still unresolved is looked for where Python environments and CUDA installs keep them.
  for lib in $(ldd "$easel" | awk '/not found/ {print $1}'); do
    found=$(find /opt /usr /root -name "$lib" 2>/dev/null | head -1)
    [ -n "$found" ] && export LD_LIBRARY_PATH="$(dirname "$found"):$LD_LIBRARY_PATH"
  done
  ldd "$easel" | grep "not found" && echo "the CUDA build lacks the libraries above"
  # Wheels carried in .whl (diffusers and what it needs that the image lacks).
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi
started=$(date +%s)
echo "== easel check on $device $(date -u +%Y-%m-%dT%H:%MZ) ($(uname -m), $(nproc) cores)"
status=0

echo "== (a) parity with the committed diffusers references"
# candle has no bf16 matmul on the CPU: there f16 stands in for half precision.
if [ "$device" = cpu ]; then dtypes="f32 f16"; else dtypes="f32 f16 bf16"; fi
for dtype in $dtypes; do
  "$easel" bench parity --device "$device" --dtype "$dtype" || status=1
done

echo "== (b) easel against PyTorch/diffusers, same device, same random weights"
if python3 -c "import torch, diffusers, transformers" 2>/dev/null; then
  PYTHONUNBUFFERED=1 python3 tools/gpu/vs_torch.py --easel "$easel" --device "$device" $tiny || status=1
else
  echo "skipped: python3 lacks torch, diffusers or transformers (carry diffusers as a wheel in .whl)"
  status=1
fi
echo "== done in $(( $(date +%s) - started )) s, status $status"
exit $status
