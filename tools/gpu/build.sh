#!/usr/bin/env bash
# Builds easel for NVIDIA GPUs on a machine without one, from a clean checkout:
#
#   tools/gpu/build.sh                # --features cuda, CUDA 13.0 from PyPI wheels, sm_90 (H100/H200)
#   CUDA_COMPUTE_CAP=89 tools/gpu/build.sh   # another GPU generation (80, 86, 89, 90)
#   tools/gpu/build.sh --flash-attn   # also FlashAttention-2 (candle-flash-attn): 53 CUDA kernels,
#                                     # hours on 2 cores and ~3 GB of memory per nvcc job; it fetches
#                                     # CUTLASS v3.5.0 by git unless $CUDAFORGE_HOME holds a checkout
#
# Writes the stripped binary to target/gpu/easel (~95 MB: candle's CUDA kernels are inside) and
# target/gpu/easel.xz (~25 MB), which is what a device call carries (its limit is 64 MiB);
# tools/gpu/check.sh unpacks it there.
# The binary links the driver (libcuda.so.1), cublas/cublasLt, curand and nvrtc dynamically, and
# the CUDA runtime statically; on the GPU machine they come from the driver and from PyTorch's
# nvidia wheels (check.sh sets LD_LIBRARY_PATH), or from a CUDA 13 install.
set -euo pipefail
cd "$(dirname "$0")/../.."

features=cuda
for arg in "$@"; do
  case "$arg" in
    --flash-attn) features=cuda,flash-attn ;;
    *) echo "usage: tools/gpu/build.sh [--flash-attn]" >&2; exit 2 ;;
  esac
done

cargo fetch --quiet
EASEL_CUDA_LINK=1 source tools/gpu/cuda-env.sh
started=$(date +%s)
cargo build --release -p easel-cli --features "$features"
mkdir -p target/gpu
strip -o target/gpu/easel target/release/easel
xz -T0 -6 -c target/gpu/easel > target/gpu/easel.xz
echo "built target/gpu/easel ($features, sm_${CUDA_COMPUTE_CAP}) in $(( $(date +%s) - started )) s; $(du -h target/gpu/easel | cut -f1), $(du -h target/gpu/easel.xz | cut -f1) packed"
readelf -d target/gpu/easel | grep NEEDED | sed 's/^/  /'
