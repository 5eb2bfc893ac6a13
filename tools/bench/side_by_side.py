"""Both sides of a side-by-side benchmark: PyTorch timed in-process after one warm-up, and
`easel bench KIND` run on the same weights and inputs with the same thread count, its saved
output compared with PyTorch's."""

import argparse
import json
import os
import resource
import subprocess
import time

import torch

from safetensors.torch import load_file


def run_easel(easel, kind, model_dir, inputs, iters, threads, out_path, extra=()):
    """Returns easel's JSON report and the easel process's peak RSS in GB; its output is saved
    to `out_path` (compare it with `relative_l2`). `extra`: more `easel bench KIND` arguments."""
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    res = subprocess.run(
        [easel, "bench", kind, "--model", model_dir, "--iters", str(iters), "--inputs", inputs, "--save-output", out_path, *extra],
        env=env, check=True, capture_output=True, text=True,
    )
    report = json.loads(res.stdout.strip().splitlines()[-1])
    return report, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6


def relative_l2(out_path, ref):
    out = load_file(out_path)["latents"]
    return float((out - ref).norm() / ref.norm())


def time_torch(fn, iters):
    """One untimed call, then the median of `iters` timed ones; returns (seconds, last output)."""
    with torch.no_grad():
        fn()
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2], out


def parse_args(**extra):
    """--size, --threads, --iters, --easel (the release binary), plus `extra` integer options
    (name=default); sets PyTorch's thread count and seed."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    for name, default in extra.items():
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--easel", default=os.path.join(os.path.dirname(__file__), "..", "..", "target", "release", "easel"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return args


def sd15_unet():
    """SD 1.5's UNet config (runwayml/stable-diffusion-v1-5/unet/config.json), random weights."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64,
        cross_attention_dim=768,
        attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
