# Source me: installs NVIDIA's CUDA 13.0 toolchain from PyPI (no GPU, no system CUDA needed) and
# exports what candle's build scripts read. Used by CI (`cargo check --features cuda`) and by
# tools/gpu/build.sh (a linked binary).
#
#   source tools/gpu/cuda-env.sh            # compiler only: nvcc, crt, nvvm, runtime headers, cccl (~105 MB)
#   EASEL_CUDA_LINK=1 source tools/gpu/cuda-env.sh   # plus cublas, curand, nvrtc and a libcuda stub, to link
#
# Pinned to CUDA 13.0 (the versions cuda-toolkit==13.0.2 pins): the lent H200's driver is 580
# (CUDA 13.0), and PTX from a newer nvcc may be refused by it. CUDA_COMPUTE_CAP picks the GPU
# (90: H100/H200; 80, 86, 89 selectable); candle's kernels are built for it.
#
# Linking: candle-core asks cudarc for dynamic linking, so the linker wants the driver library
# libcuda.so, which no wheel ships. This script makes a link-time stub exporting the driver API's
# symbols under the soname libcuda.so.1 (the real driver answers at run time), and links the CUDA
# runtime statically (libcudart.a), so the binary needs only the driver, cublas, curand and nvrtc
# on the GPU machine.

EASEL_CUDA_DIR="${EASEL_CUDA_DIR:-$HOME/.cache/easel/cuda-13.0.2}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
_easel_cuda_root="$EASEL_CUDA_DIR/nvidia/cu13"

_easel_cuda_pip() {
  python3 -m pip install -q --disable-pip-version-check --no-deps --no-compile --target "$EASEL_CUDA_DIR" --upgrade "$@"
}

if [ ! -x "$_easel_cuda_root/bin/nvcc" ]; then
  echo "installing the CUDA 13.0 compiler wheels into $EASEL_CUDA_DIR" >&2
  _easel_cuda_pip nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 || return 1
fi

if [ -n "${EASEL_CUDA_LINK:-}" ]; then
  if [ ! -e "$_easel_cuda_root/lib/libcublas.so.13" ] || [ ! -e "$_easel_cuda_root/lib/libcurand.so.10" ] || [ ! -e "$_easel_cuda_root/lib/libnvrtc.so.13" ]; then
    echo "installing cublas, curand and nvrtc wheels (for linking) into $EASEL_CUDA_DIR" >&2
    _easel_cuda_pip nvidia-cublas==13.1.0.3 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88 \
      nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
      nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 || return 1
  fi
  # Unversioned names for the linker; the static runtime instead of libcudart.so.
  for lib in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
    ln -sf "$lib" "$_easel_cuda_root/lib/${lib%%.so.*}.so"
  done
  ln -sf libcudart_static.a "$_easel_cuda_root/lib/libcudart.a"
  rm -f "$_easel_cuda_root/lib/libcudart.so"
  # The driver API stub: every cu* function cudarc binds, under the driver's soname.
  if [ ! -e "$_easel_cuda_root/lib/stubs/libcuda.so" ]; then
    _easel_cudarc_sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs 2>/dev/null | tail -n 1)
    if [ -z "$_easel_cudarc_sys" ]; then
      echo "cudarc's sources are not in the cargo registry yet: run 'cargo fetch' first" >&2
      return 1
    fi
    mkdir -p "$_easel_cuda_root/lib/stubs"
    grep -oE '^\s+(pub )?(unsafe )?fn cu[A-Za-z0-9_]+\(' "$_easel_cudarc_sys" | grep -oE 'cu[A-Za-z0-9_]+' | sort -u \
      | awk '{print "int " $1 "(void) { return 999; }"}' > "$_easel_cuda_root/lib/stubs/libcuda_stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$_easel_cuda_root/lib/stubs/libcuda.so" "$_easel_cuda_root/lib/stubs/libcuda_stub.c" || return 1
  fi
fi

export CUDA_HOME="$_easel_cuda_root"
export NVCC="$_easel_cuda_root/bin/nvcc"
export PATH="$_easel_cuda_root/bin:$PATH"
export CUDARC_CUDA_VERSION=13000
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-2}"
nvcc --version | tail -n 2 >&2
