"""Benchmark: switching LoRA stacks against loading the model fresh, on an SD-1.5-size pipeline.

Builds a Stable Diffusion 1.5-size pipeline with random weights (UNet 860M, CLIP-L text encoder,
VAE; runwayml/stable-diffusion-v1-5's configs) and two rank-16 kohya LoRAs on every attention
projection of the UNet and the text encoder (the usual "brand/character" LoRA shape), then runs
`easel bench lora`: one fresh load of the pipeline, then switches to [a], [b], [a, b] and back
to [] (the base stays in memory; only the touched weights are rebuilt).

    python3 tools/bench/lora_switch.py [--rank 16]

Needs a release build of easel (cargo build --release -p easel-cli) and ~10 GB of free memory.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "fixtures"))
from clip_tokenizer import save_clip_tokenizer  # noqa: E402

ATTN = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")


def kohya_lora(modules, prefix, rank, seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in modules:
        if not isinstance(m, torch.nn.Linear) or not name.endswith(ATTN):
            continue
        key = prefix + name.replace(".", "_")
        out[f"{key}.lora_down.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.01
        out[f"{key}.lora_up.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.01
        out[f"{key}.alpha"] = torch.tensor(float(rank))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--easel", default=os.path.join(os.path.dirname(__file__), "..", "..", "target", "release", "easel"))
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "sd15-random")
        unet = UNet2DConditionModel(
            sample_size=64, cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
        te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, max_position_embeddings=77, vocab_size=49408, projection_dim=768))
        vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4)
        tok = save_clip_tokenizer(os.path.join(model_dir, "tokenizer"), pad_token="<|endoftext|>")
        pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=te, tokenizer=tok, scheduler=EulerDiscreteScheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(model_dir, safe_serialization=True)
        loras = []
        for tag, seed in (("a", 1), ("b", 2)):
            t = kohya_lora(unet.named_modules(), "lora_unet_", args.rank, seed)
            t.update(kohya_lora(te.named_modules(), "lora_te_", args.rank, seed + 10))
            path = os.path.join(tmp, f"{tag}.safetensors")
            save_file(t, path)
            loras.append(path)
            modules = len([k for k in t if k.endswith(".alpha")])
        size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(model_dir) for f in fs) / 1e9
        del pipe, unet, te, vae
        res = subprocess.run([args.easel, "bench", "lora", "--model", model_dir, "--lora", loras[0], loras[1]], check=True, capture_output=True, text=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"SD-1.5-size pipeline, {size:.2f} GB of f32 weights; LoRAs: rank {args.rank} on {modules} attention projections each (UNet + text encoder)")
        print(f"fresh load: {r['load_s']:.2f} s")
        for k, v in r["switch_s"].items():
            print(f"switch to [{k}]: {v * 1000:.0f} ms ({r['load_s'] / v:.0f}x faster than a fresh load)")


if __name__ == "__main__":
    main()
