"""Benchmark: one UNet evaluation of an SD-1.5-size UNet (or with --sdxl 1 an SDXL-size one),
easel (candle) against PyTorch/diffusers.

Same random weights, same inputs, same machine, same thread count, one run. Prints both
timings and the ratios easel/PyTorch for evaluation and for loading the weights, and checks
that both produced the same output.

    python3 tools/bench/unet_vs_diffusers.py [--size 256 --batch 2 --threads 2 --iters 3]
    python3 tools/bench/unet_vs_diffusers.py --sdxl 1 --size 512

Needs a release build of easel (cargo build --release -p easel-cli) and ~8 GB of free memory
(~20 GB with --sdxl 1).
"""

import os
import tempfile
import time

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from side_by_side import parse_args, relative_l2, run_easel, sd15_unet, time_torch


def main():
    args = parse_args(batch=2, sdxl=0)
    name = "SDXL-size" if args.sdxl else "SD-1.5-size"

    with tempfile.TemporaryDirectory() as tmp:
        if args.sdxl:
            # SDXL base's UNet config (stabilityai/stable-diffusion-xl-base-1.0/unet/config.json),
            # random weights: 2.6B parameters, 10 GB in f32.
            unet = UNet2DConditionModel(
                sample_size=128,
                cross_attention_dim=2048,
                attention_head_dim=(5, 10, 20),
                block_out_channels=(320, 640, 1280),
                layers_per_block=2,
                transformer_layers_per_block=(1, 2, 10),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816,
            )
        else:
            unet = sd15_unet()
        model_dir = os.path.join(tmp, "unet-random")
        unet.save_pretrained(os.path.join(model_dir, "unet"), safe_serialization=True)
        del unet
        # An SDXL-size UNet is saved in shards: count them all.
        unet_dir = os.path.join(model_dir, "unet")
        size_gb = sum(os.path.getsize(os.path.join(unet_dir, f)) for f in os.listdir(unet_dir) if f.endswith(".safetensors")) / 1e9

        lat = args.size // 8
        sample = torch.randn(args.batch, 4, lat, lat)
        context = torch.randn(args.batch, 77, 2048 if args.sdxl else 768)
        tensors = {"sample": sample, "context": context}
        added = None
        if args.sdxl:
            # Pooled text embeddings and add_time_ids (original size, crop, target size).
            added = {"text_embeds": torch.randn(args.batch, 1280), "time_ids": torch.tensor([[args.size, args.size, 0, 0, args.size, args.size]] * args.batch, dtype=torch.float32)}
            tensors.update(added)
        inputs = os.path.join(tmp, "inputs.safetensors")
        save_file(tensors, inputs)

        # PyTorch: load, then evaluate.
        t0 = time.perf_counter()
        unet = UNet2DConditionModel.from_pretrained(os.path.join(model_dir, "unet"))
        torch_load = time.perf_counter() - t0
        unet.eval()
        # The first evaluation on its own: PyTorch's safetensors load is lazy (pages are read
        # on first use), so load alone flatters it; load plus first evaluation is what a cold
        # request waits for, on both sides.
        with torch.no_grad():
            t0 = time.perf_counter()
            unet(sample, 500, encoder_hidden_states=context, added_cond_kwargs=added)
            torch_first = time.perf_counter() - t0
        torch_eval, ref = time_torch(lambda: unet(sample, 500, encoder_hidden_states=context, added_cond_kwargs=added).sample, args.iters)
        del unet

        # easel, the same weights and inputs, the same thread count.
        out_path = os.path.join(tmp, "out.safetensors")
        easel, easel_rss_gb = run_easel(args.easel, "unet", model_dir, inputs, args.iters, args.threads, out_path)
        rel = relative_l2(out_path, ref)

    print(f"{name} UNet, {size_gb:.2f} GB f32 weights, {args.size}x{args.size}, batch {args.batch}, {args.threads} threads")
    print(f"eval  : easel {easel['eval_s_median']:.3f} s   pytorch {torch_eval:.3f} s   ratio easel/pytorch {easel['eval_s_median'] / torch_eval:.2f}")
    print(f"load  : easel {easel['load_s']:.3f} s   pytorch {torch_load:.3f} s   ratio easel/pytorch {easel['load_s'] / torch_load:.2f}")
    easel_cold, torch_cold = easel["load_s"] + easel["first_eval_s"], torch_load + torch_first
    print(f"load + first eval: easel {easel_cold:.3f} s   pytorch {torch_cold:.3f} s   ratio easel/pytorch {easel_cold / torch_cold:.2f}")
    print(f"output: relative L2 difference {rel:.2e}; easel peak RSS {easel_rss_gb:.2f} GB (load and evaluations)")


if __name__ == "__main__":
    main()
