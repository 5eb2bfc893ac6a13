"""Benchmark: one FLUX transformer evaluation, easel (candle) against PyTorch/diffusers, f32.

FLUX.1 does not fit this 2-core, 24 GB machine at full size (12B parameters, 48 GB in f32), so
the model is FLUX-shaped and scaled down: FLUX.1-dev's head size (128), rotary axes
(16, 56, 56), T5 width (4096), CLIP pooled width (768), 64 packed latent channels and guidance
embedding, with 8 heads (width 1024) instead of 24 and 4 + 8 blocks instead of 19 + 38.
Same random weights, same inputs, same machine, same thread count, one run. Prints both
timings, the ratio easel/PyTorch, and checks the outputs agree. With --quantize it also times
easel on GGUF copies of the same weights and reports their size and error; with --lora-rank the
per-evaluation cost of a LoRA run beside the first quantized type's weights (low-rank at run
time) and merged into the f32 weights.

    python3 tools/bench/flux_vs_diffusers.py [--size 256 --text 256 --threads 2 --iters 3 --quantize q8_0,q4_0,q4_k --lora-rank 16]

Needs a release build of easel (cargo build --release -p easel-cli) and ~6 GB of free memory.
"""

import argparse
import json
import os
import subprocess
import tempfile
import time

import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file, save_file

CONFIG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=4,
    num_single_layers=8,
    attention_head_dim=128,
    num_attention_heads=8,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=[16, 56, 56],
)


def bfl_lora(cfg, rank):
    """A random kohya LoRA on every projection of every block, with BFL names."""
    h = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    shapes = {}
    for i in range(cfg["num_layers"]):
        for s in ("img", "txt"):
            shapes[f"double_blocks_{i}_{s}_attn_qkv"] = (h, 3 * h)
            shapes[f"double_blocks_{i}_{s}_attn_proj"] = (h, h)
            shapes[f"double_blocks_{i}_{s}_mlp_0"] = (h, 4 * h)
            shapes[f"double_blocks_{i}_{s}_mlp_2"] = (4 * h, h)
    for i in range(cfg["num_single_layers"]):
        shapes[f"single_blocks_{i}_linear1"] = (h, 7 * h)
        shapes[f"single_blocks_{i}_linear2"] = (5 * h, h)
    out = {}
    for name, (fan_in, fan_out) in shapes.items():
        out[f"lora_unet_{name}.lora_down.weight"] = torch.randn(rank, fan_in) * 0.01
        out[f"lora_unet_{name}.lora_up.weight"] = torch.randn(fan_out, rank) * 0.01
        out[f"lora_unet_{name}.alpha"] = torch.tensor(float(rank))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (tokens = (size/16)^2)")
    ap.add_argument("--text", type=int, default=256, help="T5 tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--quantize", default="q8_0,q4_0,q4_k")
    ap.add_argument("--lora-rank", type=int, default=16, help="also time a kohya LoRA of this rank on every block projection (0: skip)")
    ap.add_argument("--easel", default=os.path.join(os.path.dirname(__file__), "..", "..", "target", "release", "easel"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        model = FluxTransformer2DModel(**CONFIG)
        params = sum(p.numel() for p in model.parameters())
        model_dir = os.path.join(tmp, "flux-scaled")
        model.save_pretrained(os.path.join(model_dir, "transformer"), safe_serialization=True)
        del model

        tokens = (args.size // 16) ** 2
        side = args.size // 16
        ids = torch.zeros(side, side, 3)
        ids[..., 1] = torch.arange(side)[:, None]
        ids[..., 2] = torch.arange(side)[None, :]
        inputs = {
            "img": torch.randn(1, tokens, 64),
            "img_ids": ids.reshape(-1, 3),
            "txt": torch.randn(1, args.text, 4096),
            "txt_ids": torch.zeros(args.text, 3),
            "timesteps": torch.tensor([0.7]),
            "pooled": torch.randn(1, 768),
            "guidance": torch.tensor([3.5]),
        }
        inputs_path = os.path.join(tmp, "inputs.safetensors")
        save_file(inputs, inputs_path)

        t0 = time.perf_counter()
        model = FluxTransformer2DModel.from_pretrained(os.path.join(model_dir, "transformer"))
        torch_load = time.perf_counter() - t0
        model.eval()
        kwargs = dict(
            hidden_states=inputs["img"], encoder_hidden_states=inputs["txt"], pooled_projections=inputs["pooled"],
            timestep=inputs["timesteps"], img_ids=inputs["img_ids"], txt_ids=inputs["txt_ids"], guidance=inputs["guidance"], return_dict=False,
        )
        with torch.no_grad():
            model(**kwargs)
            times = []
            for _ in range(args.iters):
                t = time.perf_counter()
                ref = model(**kwargs)[0]
                times.append(time.perf_counter() - t)
        torch_eval = sorted(times)[len(times) // 2]
        del model

        env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))

        def easel(extra, tag):
            out_path = os.path.join(tmp, f"out-{tag}.safetensors")
            res = subprocess.run(
                [args.easel, "bench", "flux", "--model", model_dir, "--inputs", inputs_path, "--iters", str(args.iters), "--save-output", out_path] + extra,
                env=env, check=True, capture_output=True, text=True,
            )
            r = json.loads(res.stdout.strip().splitlines()[-1])
            out = load_file(out_path)["latents"]
            r["rel_l2"] = float((out - ref).norm() / ref.norm())
            return r

        full = easel([], "f32")
        print(f"config: {json.dumps(CONFIG)}; {params / 1e6:.0f}M parameters; {tokens} image + {args.text} text tokens; {args.threads} threads")
        print(f"PyTorch {torch.__version__} eval {torch_eval:.3f}s (load {torch_load:.2f}s)")
        print(f"easel   eval {full['eval_s_median']:.3f}s (load {full['load_s']:.2f}s), weights {full['weights_bytes'] / 2**20:.0f} MiB, rel L2 vs PyTorch {full['rel_l2']:.1e}")
        print(f"ratio easel/PyTorch: eval {full['eval_s_median'] / torch_eval:.2f}, load {full['load_s'] / torch_load:.2f}")
        ggufs = []
        for q in [q for q in args.quantize.split(",") if q]:
            gguf = os.path.join(tmp, f"{q}.gguf")
            subprocess.run([args.easel, "models", "quantize", "--model", model_dir, "--type", q, "-o", gguf], check=True, capture_output=True)
            r = easel(["--transformer", gguf], q)
            ggufs.append((q, gguf, r))
            print(f"easel {q:<5} eval {r['eval_s_median']:.3f}s, weights {r['weights_bytes'] / 2**20:.0f} MiB, rel L2 vs f32 PyTorch {r['rel_l2']:.1e}")
        if args.lora_rank and ggufs:
            lora = os.path.join(tmp, "lora.safetensors")
            save_file(bfl_lora(CONFIG, args.lora_rank), lora)
            q, gguf, plain = ggufs[0]
            r = easel(["--transformer", gguf, "--lora", lora], f"{q}-lora")
            over = r["eval_s_median"] - plain["eval_s_median"]
            print(f"easel {q} + LoRA rank {args.lora_rank} at run time: eval {r['eval_s_median']:.3f}s, +{over:.3f}s per evaluation ({100 * over / plain['eval_s_median']:.1f}%)")
            r = easel(["--lora", lora], "f32-lora")
            print(f"easel f32 + the same LoRA merged: eval {r['eval_s_median']:.3f}s (merged weights cost nothing per step)")


if __name__ == "__main__":
    main()
