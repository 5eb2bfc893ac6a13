"""Benchmark: one VAE decode of an SD-1.5-size VAE, easel (candle) against PyTorch/diffusers.

SD 1.5's VAE config (block_out_channels 128/256/512/512, 2 layers per block), random weights,
the same latents, the same machine and thread count, one run. Both sides load the weights
first and are timed on decodes alone (median of --iters after one warm-up each). Prints both
timings, the ratio easel/PyTorch, the output difference, and the easel process's peak RSS.

    python3 tools/bench/vae_vs_diffusers.py [--size 256 --threads 2 --iters 3]

Needs a release build of easel (cargo build --release -p easel-cli).
"""

import os
import tempfile

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from side_by_side import parse_args, relative_l2, run_easel, time_torch


def main():
    args = parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            scaling_factor=0.18215,
        ).eval()
        model_dir = os.path.join(tmp, "sd15-vae")
        vae.save_pretrained(os.path.join(model_dir, "vae"), safe_serialization=True)
        lat = args.size // 8
        latents = torch.randn(1, 4, lat, lat)
        inputs = os.path.join(tmp, "inputs.safetensors")
        save_file({"latents": latents}, inputs)

        # PyTorch: what easel's Vae::decode does (unscale, decode, map to [0, 1]).
        torch_s, ref = time_torch(lambda: (vae.decode(latents / 0.18215).sample / 2 + 0.5).clamp(0, 1), args.iters)
        del vae

        out_path = os.path.join(tmp, "out.safetensors")
        easel, easel_rss_gb = run_easel(args.easel, "vae", model_dir, inputs, args.iters, args.threads, out_path)
        rel = relative_l2(out_path, ref)

    print(f"SD-1.5-size VAE decode, {args.size}x{args.size}, f32, {args.threads} threads (weights loaded first on both sides)")
    print(f"decode: easel {easel['eval_s_median']:.3f} s   pytorch {torch_s:.3f} s   ratio easel/pytorch {easel['eval_s_median'] / torch_s:.2f}")
    print(f"output: relative L2 difference {rel:.2e}; easel peak RSS {easel_rss_gb:.2f} GB")


if __name__ == "__main__":
    main()
