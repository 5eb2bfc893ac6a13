"""Benchmark: one SD 3.5 medium-shaped transformer evaluation, easel (candle) against PyTorch/diffusers, f32.

SD 3.5 medium (2.5B parameters, 10 GB in f32) is scaled down to fit this 2-core machine's time
budget: its head size (64), qk RMS norm, MMDiT-X dual attention in the first half of the blocks,
T5 width (4096), pooled CLIP width (2048), patch size 2 and 16 latent channels, with 12 heads
(width 768) instead of 24 and 8 blocks instead of 24. Classifier-free guidance's batch of 2, a
256x256 image (256 image tokens) and 77 CLIP + 256 T5 text tokens, as StableDiffusion3Pipeline
sends them. Same random weights, same inputs, same machine, same thread count, one run: both
sides load first (PyTorch's `from_pretrained`, easel's reading of the same safetensors), run
one untimed warm-up evaluation, then time `--iters` evaluations and report the median. Prints
both timings, the ratio easel/PyTorch, and checks that the outputs agree.

    python3 tools/bench/sd3_vs_diffusers.py [--size 256 --threads 2 --iters 3]

Needs a release build of easel (cargo build --release -p easel-cli).
"""

import argparse
import json
import os
import subprocess
import tempfile
import time

import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file, save_file

CONFIG = dict(
    sample_size=32,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=8,
    attention_head_dim=64,
    num_attention_heads=12,
    joint_attention_dim=4096,
    caption_projection_dim=768,
    pooled_projection_dim=2048,
    pos_embed_max_size=96,
    dual_attention_layers=(0, 1, 2, 3),
    qk_norm="rms_norm",
)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (image tokens = (size/16)^2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--easel", default=os.path.join(os.path.dirname(__file__), "..", "..", "target", "release", "easel"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        model = SD3Transformer2DModel(**CONFIG)
        params = sum(p.numel() for p in model.parameters())
        model_dir = os.path.join(tmp, "sd35m-scaled")
        model.save_pretrained(os.path.join(model_dir, "transformer"), safe_serialization=True)
        del model

        latent = args.size // 8
        inputs = {
            "hidden_states": torch.randn(2, 16, latent, latent),
            "timestep": torch.tensor([700.0, 700.0]),
            "encoder_hidden_states": torch.randn(2, 77 + 256, 4096),
            "pooled_projections": torch.randn(2, 2048),
        }
        inputs_path = os.path.join(tmp, "inputs.safetensors")
        save_file(inputs, inputs_path)

        t0 = time.perf_counter()
        model = SD3Transformer2DModel.from_pretrained(os.path.join(model_dir, "transformer"))
        torch_load = time.perf_counter() - t0
        model.eval()
        with torch.no_grad():
            model(**inputs, return_dict=False)
            times = []
            for _ in range(args.iters):
                t = time.perf_counter()
                ref = model(**inputs, return_dict=False)[0]
                times.append(time.perf_counter() - t)
        torch_eval = sorted(times)[len(times) // 2]
        del model

        env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
        out_path = os.path.join(tmp, "out.safetensors")
        res = subprocess.run(
            [args.easel, "bench", "sd3", "--model", model_dir, "--inputs", inputs_path, "--iters", str(args.iters), "--save-output", out_path],
            env=env, check=True, capture_output=True, text=True,
        )
        r = json.loads(res.stdout.strip().splitlines()[-1])
        out = load_file(out_path)["latents"]
        rel = float((out - ref).norm() / ref.norm())
        print(f"config: {json.dumps(CONFIG)}; {params / 1e6:.0f}M parameters; batch 2, {(args.size // 16) ** 2} image + 333 text tokens; {args.threads} threads")
        print(f"PyTorch {torch.__version__} eval {torch_eval:.3f}s (load {torch_load:.2f}s)")
        print(f"easel   eval {r['eval_s_median']:.3f}s (load {r['load_s']:.2f}s), weights {r['weights_bytes'] / 2**20:.0f} MiB, rel L2 vs PyTorch {rel:.1e}")
        print(f"ratio easel/PyTorch: eval {r['eval_s_median'] / torch_eval:.2f}, load {r['load_s'] / torch_load:.2f}")
        assert rel < 1e-4, f"outputs differ: rel L2 {rel}"


if __name__ == "__main__":
    main()
