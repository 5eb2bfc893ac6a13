"""Every speed ratio of the CPU speed issue in one run: easel against PyTorch/diffusers on the
same weights, inputs and thread count, printed as one table at the end (with the CPU model and
its SIMD flags, since the ratios differ between AVX2-only and AVX-512 machines).

    python3 tools/bench/all.py [--threads 2] [--quick]

Needs a release build (cargo build --release -p easel-cli), torch and diffusers, and ~8 GB of
free memory (~20 GB for the SDXL-size UNet). `--quick` skips the SD-1.5- and SDXL-size runs
(minutes each on 2 cores).

What each side does, so no row flatters easel:
- bundled model, 4 images of one prompt in one call: diffusers' pipeline call after one warm-up
  call in the same process, against easel's generation time (text encode + denoise + decode)
  in a fresh `easel generate --batch 4`, with no warm-up;
- cold start: process start to PNG written, one image, both sides in a fresh process, with
  each process's own peak RSS (os.wait4);
- one evaluation (UNet, FLUX-shaped transformer), VAE decode: the scripts beside this one, each
  timing both sides after one untimed evaluation; load plus first evaluation is reported
  because PyTorch's safetensors load is lazy;
- step caching: denoiser evaluations and the bundled model's all-three-right rate over the same
  seeds and prompts, cached and uncached, both in easel (there is no diffusers DeepCache).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
BUNDLED = os.path.join(ROOT, "models", "easel-shapes")
PROMPT = "a red circle on a blue background"


def cpu_summary():
    model, flags = "unknown CPU", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = [f for f in ["avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile"] if f in flags]
    return f"{model}; {' '.join(simd) or 'no AVX2'}"


def run_child(cmd, env):
    """Runs `cmd`; returns (wall seconds, that process's own peak RSS in GB, stdout, stderr)."""
    with tempfile.TemporaryFile("w+") as err_file:
        t = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err_file, text=True, env=env)
        out = p.stdout.read()
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t
        p.returncode = os.waitstatus_to_exitcode(status)
        err_file.seek(0)
        err = err_file.read()
    if status != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed: {err.strip()[-2000:]}")
    return wall, usage.ru_maxrss / 1e6, out, err


DIFFUSERS_COLD = """
import sys, torch
torch.set_num_threads(int(sys.argv[2]))
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1])
pipe.set_progress_bar_config(disable=True)
pipe(sys.argv[3], num_inference_steps=20, guidance_scale=4.0, height=64, width=64).images[0].save(sys.argv[4])
"""


def bundled_rows(easel, threads, rows):
    import torch
    from diffusers import StableDiffusionPipeline

    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    with tempfile.TemporaryDirectory() as tmp:
        # Four images of one prompt in one call.
        torch.set_num_threads(threads)
        pipe = StableDiffusionPipeline.from_pretrained(BUNDLED)
        pipe.set_progress_bar_config(disable=True)
        call = lambda: pipe(PROMPT, num_images_per_prompt=4, num_inference_steps=20, guidance_scale=4.0, height=64, width=64)
        with torch.no_grad():
            call()
            t = time.perf_counter()
            call()
            torch_s = time.perf_counter() - t
        del pipe
        out = os.path.join(tmp, "four.png")
        _, _, stdout, _ = run_child([easel, "generate", PROMPT, "--model", BUNDLED, "--batch", "4", "--steps", "20", "--guidance", "4", "--timings-json", "-o", out], env)
        t = json.loads(stdout.strip().splitlines()[-1])
        easel_s = t["encode_s"] + t["denoise_s"] + t["decode_s"]
        rows.append(("bundled model, 4 images in one call (easel cold call vs diffusers warm)", easel_s, torch_s, "<= 0.8"))


def cold_start_rows(easel, threads, rows):
    """Process start to PNG, one image, with each process's own peak RSS. Runs before this
    script imports torch: a child's peak RSS counts its parent's memory at the fork, so the
    parent must still be small."""
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    with tempfile.TemporaryDirectory() as tmp:
        easel_wall, easel_rss, _, _ = run_child([easel, "generate", PROMPT, "--model", BUNDLED, "-o", os.path.join(tmp, "cold.png")], env)
        torch_wall, torch_rss, _, _ = run_child([sys.executable, "-c", DIFFUSERS_COLD, BUNDLED, str(threads), PROMPT, os.path.join(tmp, "cold-d.png")], env)
    rows.append(("cold start to PNG, bundled model (time)", easel_wall, torch_wall, "<= 0.1"))
    rows.append(("cold start peak RSS (GB)", easel_rss, torch_rss, "<= 0.1"))


def step_cache_rows(easel, threads, rows, n):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    reports = {}
    for cache in ["none", "deepcache:2", "deepcache:3"]:
        _, _, stdout, _ = run_child([easel, "bench", "shapes", "--n", str(n), "--held-out", "0", "--cache", cache], env)
        reports[cache] = json.loads(stdout)
    base = reports["none"]
    for cache in ["deepcache:2", "deepcache:3"]:
        r = reports[cache]
        fewer = base["full_steps"] / max(r["full_steps"], 1)
        print(f"step cache {cache}: {fewer:.2f}x fewer full UNet evaluations, all three right "
              f"{r['trained_combinations']['all_three_pct']:.1f}% (uncached {base['trained_combinations']['all_three_pct']:.1f}%), "
              f"{r['seconds_per_image']:.3f} s/image (uncached {base['seconds_per_image']:.3f})")
        rows.append((f"step cache {cache}, time per image vs uncached (easel both)", r["seconds_per_image"], base["seconds_per_image"], "(evaluations and quality: the line above)"))


def script_rows(script, threads, patterns, rows, extra=()):
    """Runs a side-by-side script beside this one and takes rows from its output: each pattern
    has named groups `ours` (easel's seconds) and `theirs` (the comparison's)."""
    cmd = [sys.executable, os.path.join(HERE, script), "--threads", str(threads), *extra]
    print(f"\n$ {' '.join(cmd)}", flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    print(res.stdout, end="")
    if res.returncode != 0:
        print(res.stderr[-2000:])
        rows.append((f"{script}: failed", None, None, ""))
        return
    for label, regex, target in patterns:
        m = re.search(regex, res.stdout)
        if m:
            rows.append((label, float(m.group("ours")), float(m.group("theirs")), target))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="skip the SD-1.5- and SDXL-size UNet and VAE runs")
    ap.add_argument("--shapes", type=int, default=100, help="images per step-cache quality run")
    ap.add_argument("--easel", default=os.path.join(ROOT, "target", "release", "easel"))
    args = ap.parse_args()
    rows = []
    print(f"CPU: {cpu_summary()}; {args.threads} threads; {time.strftime('%Y-%m-%d')}", flush=True)

    cold_start_rows(args.easel, args.threads, rows)
    bundled_rows(args.easel, args.threads, rows)
    step_cache_rows(args.easel, args.threads, rows, args.shapes)
    if not args.quick:
        script_rows("unet_vs_diffusers.py", args.threads, [
            ("SD-1.5-size UNet eval, 256x256 batch 2", r"eval\s*: easel (?P<ours>[\d.]+) s\s+pytorch (?P<theirs>[\d.]+)", "<= 0.8"),
            ("SD-1.5-size UNet load + first eval", r"load \+ first eval: easel (?P<ours>[\d.]+) s\s+pytorch (?P<theirs>[\d.]+)", "<= 1.0"),
        ], rows)
        script_rows("unet_vs_diffusers.py", args.threads, [
            ("SDXL-size UNet eval, 512x512 batch 2", r"eval\s*: easel (?P<ours>[\d.]+) s\s+pytorch (?P<theirs>[\d.]+)", "<= 0.9"),
        ], rows, extra=("--sdxl", "1", "--size", "512", "--iters", "1"))
        script_rows("vae_vs_diffusers.py", args.threads, [
            ("SD-1.5-size VAE decode, 256x256", r"decode: easel (?P<ours>[\d.]+) s\s+pytorch (?P<theirs>[\d.]+)", ""),
        ], rows)
    script_rows("flux_vs_diffusers.py", args.threads, [
        ("FLUX-shaped transformer eval (f32)", r"PyTorch \S+ eval (?P<theirs>[\d.]+)s[\s\S]*?easel\s+eval (?P<ours>[\d.]+)s", "<= 0.9"),
        ("FLUX-shaped q8_0 vs easel f32", r"easel\s+eval (?P<theirs>[\d.]+)s[\s\S]*?easel q8_0\s+eval (?P<ours>[\d.]+)s", "< 1 (faster)"),
        ("FLUX-shaped q4_0 vs easel q8_0", r"easel q8_0\s+eval (?P<theirs>[\d.]+)s[\s\S]*?easel q4_0\s+eval (?P<ours>[\d.]+)s", "< 1 (faster)"),
        ("FLUX-shaped q4_k vs easel q8_0", r"easel q8_0\s+eval (?P<theirs>[\d.]+)s[\s\S]*?easel q4_k\s+eval (?P<ours>[\d.]+)s", "< 1 (faster)"),
    ], rows, extra=("--lora-rank", "0"))

    print("\n| measurement | easel | PyTorch/diffusers | ratio | target |\n| --- | --- | --- | --- | --- |")
    for label, ours, theirs, target in rows:
        if ours is None or theirs is None:
            print(f"| {label} | - | - | - | {target} |")
        else:
            print(f"| {label} | {ours:.3f} | {theirs:.3f} | {ours / theirs:.2f} | {target} |")


if __name__ == "__main__":
    main()
