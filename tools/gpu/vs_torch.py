"""easel against PyTorch/diffusers on one device: the same random weights, the same inputs, one
run, every figure also a ratio easel/PyTorch. tools/gpu/check.sh runs it; --tiny shrinks every
model so the whole script runs on a CPU in CI.

What each side does (so no figure flatters easel):
- Weights: random, made once by PyTorch and saved as safetensors; both sides load that file.
- Steps: both warm. PyTorch eager runs one untimed call, then the median of --iters timed
  calls, each ended by torch.cuda.synchronize(). easel (`easel bench unet|flux|vae`, a separate
  process) does the same and synchronizes its device after each call. Loading is timed apart.
- End to end: FluxPipeline's __call__ against `easel generate`, both encoding the prompt,
  running --steps steps and decoding; easel's figure is its own encode + denoise + decode
  timings (a cold process, so its first call: this favours PyTorch), PyTorch's the median wall
  time of warm calls. Load times are reported apart.
- Peak device memory: PyTorch's torch.cuda.max_memory_reserved() (its allocator, without the
  CUDA context) against the easel process's peak in nvidia-smi (with its context, ~0.5 GiB), so
  memory comparisons lean in PyTorch's favour.
- SD 3.5: one medium-shaped transformer step (`easel bench sd3`), as the UNet and FLUX steps.
- GGUF: diffusers has no GGUF kernels of its own here, so easel's q8_0/q4_k steps are set
  against PyTorch's bf16 step.

    python3 tools/gpu/vs_torch.py --easel target/gpu/easel [--device cuda] [--tiny] [--iters 5]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

DTYPE_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SDXL_UNET_TINY = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=32, norm_num_groups=8,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80,
)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_TINY = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
FLUX_VAE_TINY = dict(FLUX_VAE, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                     down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
                  pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD35_TINY = dict(SD35_MEDIUM, sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                 caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16, dual_attention_layers=(0,))
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768,
              vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu")
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128)


class Peak:
    """The highest device memory nvidia-smi reports for one process while it runs."""

    def __init__(self, proc):
        self.proc, self.mib, self.ok = proc, 0, True
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def poll(self):
        while self.proc.poll() is None:
            try:
                out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
            except (OSError, subprocess.TimeoutExpired):
                self.ok = False
                return
            for line in out.splitlines():
                pid, _, used = line.partition(",")
                if pid.strip() == str(self.proc.pid):
                    self.mib = max(self.mib, int(used.strip() or 0))
            time.sleep(0.05)


class Harness:
    def __init__(self, args, tmp):
        self.args, self.tmp = args, tmp
        self.dev = torch.device(args.device)
        self.rows = []

    def easel(self, argv, peak=True):
        """Runs easel; returns its last JSON line (or its stdout) and its peak device memory in MiB."""
        env = dict(os.environ, RAYON_NUM_THREADS=str(os.cpu_count()))
        proc = subprocess.Popen([self.args.easel, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        watch = Peak(proc) if peak and self.dev.type == "cuda" else None
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"easel {' '.join(argv[:2])} failed: {err.strip()[-400:]}")
        last = out.strip().splitlines()[-1] if out.strip() else "{}"
        try:
            result = json.loads(last)
        except json.JSONDecodeError:
            result = {"stdout": out, "stderr": err}
        return result, (watch.mib if watch else None)

    def torch_time(self, fn):
        sync = torch.cuda.synchronize if self.dev.type == "cuda" else (lambda: None)
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            out = fn()
            sync()
            times = []
            for _ in range(self.args.iters):
                t = time.perf_counter()
                out = fn()
                sync()
                times.append(time.perf_counter() - t)
        peak = torch.cuda.max_memory_reserved() / 2**20 if self.dev.type == "cuda" else None
        return sorted(times)[len(times) // 2], out, peak

    def row(self, name, easel_s, torch_s, rel=None, easel_mib=None, torch_mib=None, note=""):
        ratio = easel_s / torch_s if torch_s else float("nan")
        mem = f"  peak MiB easel {easel_mib} torch {torch_mib:.0f}" if easel_mib is not None and torch_mib is not None else ""
        err = f"  rel L2 {rel:.2e}" if rel is not None else ""
        print(f"{name:<34} easel {easel_s:8.4f} s  torch {torch_s:8.4f} s  ratio {ratio:5.2f}{err}{mem} {note}".rstrip(), flush=True)
        self.rows.append(dict(name=name, easel_s=easel_s, torch_s=torch_s, ratio=ratio, rel_l2=rel, easel_peak_mib=easel_mib, torch_peak_mib=torch_mib))

    def save_model(self, model, folder):
        path = os.path.join(self.tmp, folder)
        model.save_pretrained(path, safe_serialization=True, max_shard_size="100GB")
        return path

    def rel(self, easel_out, ref):
        out = load_file(easel_out)["latents"].float()
        ref = ref.float().cpu()
        return float((out - ref).norm() / ref.norm())

    def unet(self):
        from diffusers import UNet2DConditionModel

        cfg = SDXL_UNET_TINY if self.args.tiny else SDXL_UNET
        size, dtype = (64, torch.float32) if self.args.tiny else (1024, torch.float16)
        if self.dev.type == "cpu":
            dtype = torch.float32
        with torch.device(self.dev):
            model = UNet2DConditionModel(**cfg).to(dtype).eval()
        folder = os.path.join(self.tmp, "sdxl")
        self.save_model(model, os.path.join("sdxl", "unet"))
        lat, b = size // 8, 2
        text = 32 if self.args.tiny else 1280
        inputs = dict(sample=torch.randn(b, 4, lat, lat), context=torch.randn(b, 77, cfg["cross_attention_dim"]),
                      text_embeds=torch.randn(b, text), time_ids=torch.tensor([[size, size, 0, 0, size, size]] * b, dtype=torch.float32))
        path = os.path.join(self.tmp, "unet-inputs.safetensors")
        save_file(inputs, path)
        x = {k: v.to(self.dev, dtype) for k, v in inputs.items()}
        sec, ref, mib = self.torch_time(lambda: model(x["sample"], 500, encoder_hidden_states=x["context"],
                                                      added_cond_kwargs=dict(text_embeds=x["text_embeds"], time_ids=x["time_ids"])).sample)
        del model
        out = os.path.join(self.tmp, "unet-out.safetensors")
        r, peak = self.easel(["bench", "unet", "--model", folder, "--inputs", path, "--iters", str(self.args.iters), "--save-output", out,
                              "--device", self.args.device, "--dtype", DTYPE_NAMES[dtype]])
        self.row(f"SDXL UNet step {size}px b2 {DTYPE_NAMES[dtype]}", r["eval_s_median"], sec, self.rel(out, ref), peak, mib)
        shutil.rmtree(folder, ignore_errors=True)  # the disk holds one real-size model at a time

    def flux_inputs(self, cfg, size, text):
        tokens, side = (size // 16) ** 2, size // 16
        ids = torch.zeros(side, side, 3)
        ids[..., 1] = torch.arange(side)[:, None]
        ids[..., 2] = torch.arange(side)[None, :]
        return dict(img=torch.randn(1, tokens, 64), img_ids=ids.reshape(-1, 3), txt=torch.randn(1, text, cfg["joint_attention_dim"]),
                    txt_ids=torch.zeros(text, 3), timesteps=torch.tensor([0.7]), pooled=torch.randn(1, cfg["pooled_projection_dim"]),
                    guidance=torch.tensor([3.5]))

    def flux(self):
        from diffusers import FluxTransformer2DModel

        cfg = FLUX_TINY if self.args.tiny else FLUX_DEV
        size, text = (64, 16) if self.args.tiny else (1024, 512)
        dtype = torch.float32 if self.dev.type == "cpu" else torch.bfloat16
        with torch.device(self.dev):
            model = FluxTransformer2DModel(**cfg).to(dtype).eval()
        folder = os.path.join(self.tmp, "flux")
        self.save_model(model, os.path.join("flux", "transformer"))
        inputs = self.flux_inputs(cfg, size, text)
        path = os.path.join(self.tmp, "flux-inputs.safetensors")
        save_file(inputs, path)
        f32 = ("img_ids", "txt_ids", "timesteps", "guidance")
        x = {k: v.to(self.dev, torch.float32 if k in f32 else dtype) for k, v in inputs.items()}
        sec, ref, mib = self.torch_time(lambda: model(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["pooled"],
                                                      timestep=x["timesteps"], img_ids=x["img_ids"], txt_ids=x["txt_ids"],
                                                      guidance=x["guidance"], return_dict=False)[0])
        del model
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()
        out = os.path.join(self.tmp, "flux-out.safetensors")
        name = DTYPE_NAMES[dtype]
        r, peak = self.easel(["bench", "flux", "--model", folder, "--inputs", path, "--iters", str(self.args.iters), "--save-output", out,
                              "--device", self.args.device, "--dtype", name])
        self.row(f"FLUX.1-dev transformer step {size}px {name}", r["eval_s_median"], sec, self.rel(out, ref), peak, mib)
        for q in self.args.quantize.split(","):
            gguf = os.path.join(self.tmp, f"flux-{q}.gguf")
            subprocess.run([self.args.easel, "models", "quantize", "--model", folder, "--type", q, "-o", gguf], check=True, capture_output=True)
            qr, qpeak = self.easel(["bench", "flux", "--model", folder, "--transformer", gguf, "--inputs", path, "--iters", str(self.args.iters),
                                    "--save-output", out, "--device", self.args.device, "--dtype", name])
            self.row(f"  GGUF {q} step (vs torch {name})", qr["eval_s_median"], sec, self.rel(out, ref), qpeak, mib,
                     f"weights {qr['weights_bytes'] / 2**30:.2f} GiB")
            os.remove(gguf)
        shutil.rmtree(folder, ignore_errors=True)

    def sd3(self):
        """One SD 3.5 medium-shaped transformer step (MMDiT-X, qk RMS norm), batch 2 as CFG runs it."""
        from diffusers import SD3Transformer2DModel

        cfg = SD35_TINY if self.args.tiny else SD35_MEDIUM
        size, text = (64, 16) if self.args.tiny else (1024, 77 + 256)
        dtype = torch.float32 if self.dev.type == "cpu" else torch.bfloat16
        with torch.device(self.dev):
            model = SD3Transformer2DModel(**cfg).to(dtype).eval()
        folder = os.path.join(self.tmp, "sd3")
        self.save_model(model, os.path.join("sd3", "transformer"))
        inputs = dict(hidden_states=torch.randn(2, 16, size // 8, size // 8), timestep=torch.tensor([700.0, 700.0]),
                      encoder_hidden_states=torch.randn(2, text, cfg["joint_attention_dim"]),
                      pooled_projections=torch.randn(2, cfg["pooled_projection_dim"]))
        path = os.path.join(self.tmp, "sd3-inputs.safetensors")
        save_file(inputs, path)
        x = {k: v.to(self.dev, torch.float32 if k == "timestep" else dtype) for k, v in inputs.items()}
        sec, ref, mib = self.torch_time(lambda: model(**x, return_dict=False)[0])
        del model
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()
        out = os.path.join(self.tmp, "sd3-out.safetensors")
        name = DTYPE_NAMES[dtype]
        r, peak = self.easel(["bench", "sd3", "--model", folder, "--inputs", path, "--iters", str(self.args.iters), "--save-output", out,
                              "--device", self.args.device, "--dtype", name])
        self.row(f"SD3.5-medium step {size}px b2 {name}", r["eval_s_median"], sec, self.rel(out, ref), peak, mib)
        shutil.rmtree(folder, ignore_errors=True)

    def vae(self):
        from diffusers import AutoencoderKL

        cfg = FLUX_VAE_TINY if self.args.tiny else FLUX_VAE
        size = 64 if self.args.tiny else 1024
        dtype = torch.float32 if self.dev.type == "cpu" else torch.bfloat16
        with torch.device(self.dev):
            model = AutoencoderKL(**cfg).to(dtype).eval()
        folder = os.path.join(self.tmp, "vae-model")
        self.save_model(model, os.path.join("vae-model", "vae"))
        down = 2 ** (len(cfg["block_out_channels"]) - 1)
        latents = torch.randn(1, 16, size // down, size // down)
        path = os.path.join(self.tmp, "vae-inputs.safetensors")
        save_file({"latents": latents}, path)
        z = latents.to(self.dev, dtype) / cfg["scaling_factor"] + cfg["shift_factor"]
        sec, ref, mib = self.torch_time(lambda: (model.decode(z).sample.float() / 2 + 0.5).clamp(0, 1))
        del model
        out = os.path.join(self.tmp, "vae-out.safetensors")
        name = DTYPE_NAMES[dtype]
        r, peak = self.easel(["bench", "vae", "--model", folder, "--inputs", path, "--iters", str(self.args.iters), "--save-output", out,
                              "--device", self.args.device, "--dtype", name])
        self.row(f"VAE decode {size}px {name}", r["eval_s_median"], sec, self.rel(out, ref), peak, mib)
        shutil.rmtree(folder, ignore_errors=True)

    def pipeline(self):
        """FLUX.1-dev-shaped pipeline end to end: the tiny fixture's tokenizers, real-size (or
        tiny) CLIP-L, T5-XXL, transformer and VAE with random weights."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

        tiny = self.args.tiny
        fixture = os.path.join(ROOT, "fixtures", "pipelines", "flux-dev-tiny")
        dtype = torch.float32 if self.dev.type == "cpu" else torch.bfloat16
        size, steps = (64, 4) if tiny else (1024, self.args.steps)
        with torch.device(self.dev):
            if tiny:
                clip = CLIPTextModel.from_pretrained(os.path.join(fixture, "text_encoder"))
                t5 = T5EncoderModel.from_pretrained(os.path.join(fixture, "text_encoder_2"))
                transformer = FluxTransformer2DModel.from_pretrained(os.path.join(fixture, "transformer"))
                vae = AutoencoderKL.from_pretrained(os.path.join(fixture, "vae"))
            else:
                clip = CLIPTextModel(CLIPTextConfig(**CLIP_L))
                t5 = T5EncoderModel(T5Config(**T5_XXL))
                transformer = FluxTransformer2DModel(**FLUX_DEV)
                vae = AutoencoderKL(**FLUX_VAE)
        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(os.path.join(fixture, "scheduler")),
            vae=vae, text_encoder=clip, tokenizer=CLIPTokenizer.from_pretrained(os.path.join(fixture, "tokenizer")),
            text_encoder_2=t5, tokenizer_2=T5TokenizerFast.from_pretrained(os.path.join(fixture, "tokenizer_2")), transformer=transformer,
        ).to(self.dev, dtype)
        pipe.set_progress_bar_config(disable=True)
        folder = os.path.join(self.tmp, "flux-pipeline")
        pipe.save_pretrained(folder, safe_serialization=True, max_shard_size="100GB")
        gen = lambda: pipe("a lighthouse at dusk", height=size, width=size, num_inference_steps=steps, guidance_scale=3.5,
                           max_sequence_length=512, output_type="pt", generator=torch.Generator(self.dev).manual_seed(0))
        sec, _, mib = self.torch_time(gen)
        del pipe, clip, t5, transformer, vae
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()
        name = DTYPE_NAMES[dtype]
        png = os.path.join(self.tmp, "e2e.png")
        r, peak = self.easel(["generate", "--model", folder, "a lighthouse at dusk", "--steps", str(steps), "--guidance", "3.5",
                              "--width", str(size), "--height", str(size), "--device", self.args.device, "--dtype", name, "-o", png,
                              "--seed", "0", "--timings-json"])
        self.row(f"FLUX.1-dev pipeline {steps} steps {size}px", r["encode_s"] + r["denoise_s"] + r["decode_s"], sec, None, peak, mib,
                 f"(easel load {r['load_s']:.1f} s)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--easel", default=os.path.join(ROOT, "target", "gpu", "easel"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny models, for a CPU (CI runs this)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--quantize", default="q8_0,q4_k")
    ap.add_argument("--only", default="unet,sd3,vae,flux,pipeline")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    torch.manual_seed(0)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"torch {torch.__version__} on {name}; easel {args.easel}", flush=True)
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        h = Harness(args, tmp)
        for bench in args.only.split(","):
            try:
                getattr(h, bench)()
            except Exception as e:  # one failing benchmark must not hide the others' figures
                failed += 1
                print(f"{bench}: FAILED: {type(e).__name__}: {str(e)[-600:]}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(h.rows, f, indent=1)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
