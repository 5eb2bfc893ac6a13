"""Benchmark: one UNet evaluation of an SD-1.5-size UNet, easel (candle) against PyTorch/diffusers.

Same random weights, same inputs, same machine, same thread count, one run. Prints both
timings and the ratios easel/PyTorch for evaluation and for loading the weights, and checks
that both produced the same output.

    python3 tools/bench/unet_vs_diffusers.py [--size 256 --batch 2 --threads 2 --iters 3]

Needs a release build of easel (cargo build --release -p easel-cli) and ~8 GB of free memory.
"""

import argparse
import json
import os
import subprocess
import tempfile
import time

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--easel", default=os.path.join(os.path.dirname(__file__), "..", "..", "target", "release", "easel"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        # SD 1.5's UNet config (runwayml/stable-diffusion-v1-5/unet/config.json), random weights.
        unet = UNet2DConditionModel(
            sample_size=64,
            cross_attention_dim=768,
            attention_head_dim=8,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
        model_dir = os.path.join(tmp, "sd15-random")
        unet.save_pretrained(os.path.join(model_dir, "unet"), safe_serialization=True)
        del unet
        size_gb = os.path.getsize(os.path.join(model_dir, "unet", "diffusion_pytorch_model.safetensors")) / 1e9

        lat = args.size // 8
        sample = torch.randn(args.batch, 4, lat, lat)
        context = torch.randn(args.batch, 77, 768)
        inputs = os.path.join(tmp, "inputs.safetensors")
        save_file({"sample": sample, "context": context}, inputs)

        # PyTorch: load, then evaluate.
        t0 = time.perf_counter()
        unet = UNet2DConditionModel.from_pretrained(os.path.join(model_dir, "unet"))
        torch_load = time.perf_counter() - t0
        unet.eval()
        with torch.no_grad():
            unet(sample, 500, encoder_hidden_states=context)
            times = []
            for _ in range(args.iters):
                t = time.perf_counter()
                ref = unet(sample, 500, encoder_hidden_states=context).sample
                times.append(time.perf_counter() - t)
        torch_eval = sorted(times)[len(times) // 2]
        del unet

        # easel, the same weights and inputs, the same thread count.
        out_path = os.path.join(tmp, "out.safetensors")
        env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
        res = subprocess.run(
            [args.easel, "bench", "unet", "--model", model_dir, "--iters", str(args.iters), "--inputs", inputs, "--save-output", out_path],
            env=env, check=True, capture_output=True, text=True,
        )
        easel = json.loads(res.stdout.strip().splitlines()[-1])
        from safetensors.torch import load_file

        out = load_file(out_path)["latents"]
        rel = float((out - ref).norm() / ref.norm())

    print(f"SD-1.5-size UNet, {size_gb:.2f} GB f32 weights, {args.size}x{args.size}, batch {args.batch}, {args.threads} threads")
    print(f"eval  : easel {easel['eval_s_median']:.3f} s   pytorch {torch_eval:.3f} s   ratio easel/pytorch {easel['eval_s_median'] / torch_eval:.2f}")
    print(f"load  : easel {easel['load_s']:.3f} s   pytorch {torch_load:.3f} s   ratio easel/pytorch {easel['load_s'] / torch_load:.2f}")
    print(f"output: relative L2 difference {rel:.2e}")


if __name__ == "__main__":
    main()
