"""Train easel-shapes, the small text-to-image model bundled with easel.

Same classes as Stable Diffusion 1.5 at tiny sizes: AutoencoderKL, UNet2DConditionModel,
CLIPTextModel with the real CLIP BPE tokenizer, saved as a diffusers StableDiffusionPipeline.
CPU only, deterministic (seeded, single process).

    # the shipped version: the 8000-step schedule, stopped after step 4000 (about 50 minutes
    # on 2 cores: VAE 1800 steps, then the UNet and text encoder)
    python3 tools/bundled/train.py --out /tmp/easel-shapes --stop-after 4000
    # then copy its components into models/easel-shapes and run tools/bundled/reference.py
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "fixtures"))

from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

import shapes
from clip_tokenizer import save_clip_tokenizer
from half_token_table import half_token_table

SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def make_vae():
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=[16, 32, 64],
        layers_per_block=1,
        latent_channels=4,
        # GroupNorm removes each group's spatial mean: with one channel per group a flat
        # background's colour could not survive the decoder's final norm. Keep 4 per group.
        norm_num_groups=4,
        sample_size=64,
    )


def make_unet(context_dim):
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=context_dim,
        attention_head_dim=4,
        norm_num_groups=8,
    )


def make_text_encoder():
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            projection_dim=32,
        )
    )


def to_tensor(images):
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(vae, steps, log):
    imgs, _, _ = shapes.dataset(1, 8192, shapes.all_combos())
    x_all = to_tensor(imgs)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(2)
    for step in range(steps):
        idx = torch.randint(0, len(x_all), (32,), generator=g)
        x = x_all[idx]
        # Deterministic autoencoding (z = posterior mean): the posterior noise of an untrained
        # encoder swamps a tiny decoder on CPU budgets. A light penalty keeps latents bounded;
        # diffusion later uses the mean too, rescaled by scaling_factor.
        z = vae.encode(x).latent_dist.mean
        rec = vae.decode(z).sample
        kl = z.pow(2).mean()
        # L1 as well as MSE: it keeps the shapes' edges and corners crisp, which the shape
        # checker (and a viewer) cares about more than the last bit of colour accuracy.
        loss = F.mse_loss(rec, x) + F.l1_loss(rec, x) + 1e-4 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step} mse {F.mse_loss(rec, x).item():.5f} z2 {kl.item():.2f}")


@torch.no_grad()
def encode_all(vae, x, batch=256):
    return torch.cat([vae.encode(x[i : i + batch]).latent_dist.mean for i in range(0, len(x), batch)])


@torch.no_grad()
def swap(params, ema):
    """Exchanges the live weights with their EMA (so saving a checkpoint can resume training)."""
    for e, p in zip(ema, params):
        tmp = p.detach().clone()
        p.copy_(e)
        e.copy_(tmp)


def save_pipeline(out, vae, text_encoder, tokenizer, unet):
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULE, steps_offset=1, timestep_spacing="leading"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    # The token table in float16 (see half_token_table.py: the repository's size budget).
    half_token_table(os.path.join(out, "text_encoder", "model.safetensors"))
    with open(os.path.join(out, "easel.json"), "w") as f:
        json.dump({"steps": 20, "guidance": 4.0}, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="models/easel-shapes")
    ap.add_argument("--vae-steps", type=int, default=1800)
    ap.add_argument("--unet-steps", type=int, default=8000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--samples", type=int, default=40000)
    ap.add_argument("--checkpoint-every", type=int, default=0, help="also save the EMA weights every N UNet steps")
    ap.add_argument("--stop-after", type=int, default=None, help="end after this UNet step of the --unet-steps schedule (the learning rate still follows the full schedule)")
    ap.add_argument("--min-snr", type=float, default=5.0, help="min-SNR-gamma loss weighting (0: off)")
    ap.add_argument("--offset-noise", type=float, default=0.1, help="per-channel constant noise added in training (0: off)")
    ap.add_argument("--resume", default=None, help="continue training the UNet and text encoder of this pipeline (its VAE is kept)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()
    logf = open(os.path.join("/tmp", "easel-shapes-train.log"), "w")

    def log(msg):
        line = f"[{time.time() - t0:7.1f}s] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    if args.resume:
        vae = AutoencoderKL.from_pretrained(os.path.join(args.resume, "vae"))
    else:
        vae = make_vae()
        train_vae(vae, args.vae_steps, log)
    vae.eval().requires_grad_(False)

    imgs, captions, _ = shapes.dataset(3 + args.seed, args.samples)
    latents = encode_all(vae, to_tensor(imgs))
    scaling = vae.config.scaling_factor if args.resume else float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    latents = latents * scaling
    log(f"latents {tuple(latents.shape)} scaling_factor {scaling:.4f}")

    tok_dir = os.path.join(args.out, "tokenizer")
    tokenizer = save_clip_tokenizer(tok_dir)
    ids_all = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty_ids = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids

    if args.resume:
        text_encoder = CLIPTextModel.from_pretrained(os.path.join(args.resume, "text_encoder"))
        unet = UNet2DConditionModel.from_pretrained(os.path.join(args.resume, "unet"))
    else:
        text_encoder = make_text_encoder()
        unet = make_unet(text_encoder.config.hidden_size)
    log(f"unet params {sum(p.numel() for p in unet.parameters())/1e6:.2f}M, text params {sum(p.numel() for p in text_encoder.parameters())/1e6:.2f}M")
    noise_sched = DDPMScheduler(**SCHEDULE)
    alphas_cumprod = noise_sched.alphas_cumprod
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    warm = 200
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(s, args.unet_steps) / args.unet_steps))
    )
    g = torch.Generator().manual_seed(4 + args.seed)
    ema = [p.detach().clone() for p in params]
    for step in range(args.unet_steps):
        idx = torch.randint(0, len(latents), (args.batch,), generator=g)
        x0 = latents[idx]
        ids = ids_all[idx].clone()
        drop = torch.rand(args.batch, generator=g) < 0.1
        ids[drop] = empty_ids
        noise = torch.randn(x0.shape, generator=g)
        # Offset noise: SD's schedule leaves a little of the image's mean colour in x_T, and
        # a 16x16 latent's noise has a large random mean; a constant per-channel term teaches
        # the model to set the background colour from the prompt, not from the init noise.
        noise = noise + args.offset_noise * torch.randn(x0.shape[0], x0.shape[1], 1, 1, generator=g)
        t = torch.randint(0, 1000, (args.batch,), generator=g)
        xt = noise_sched.add_noise(x0, noise, t)
        ctx = text_encoder(ids)[0]
        pred = unet(xt, t, encoder_hidden_states=ctx).sample
        per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        if args.min_snr > 0:
            # min-SNR-gamma (Hang et al. 2023): down-weight the easy low-noise steps so the
            # few steps this budget allows go to the global layout (which shape, which colour).
            snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
            per_sample = per_sample * torch.clamp(snr, max=args.min_snr) / snr
        loss = per_sample.mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for e, p in zip(ema, params):
                e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        if step % 100 == 0 or step == args.unet_steps - 1:
            log(f"unet step {step} loss {loss.item():.4f} lr {lr_sched.get_last_lr()[0]:.2e}")
        if args.checkpoint_every and step and step % args.checkpoint_every == 0:
            swap(params, ema)
            save_pipeline(f"{args.out}-step{step}", vae, text_encoder, tokenizer, unet)
            swap(params, ema)
            log(f"checkpoint {args.out}-step{step}")
        if args.stop_after is not None and step >= args.stop_after:
            log(f"stopping after step {step} of the {args.unet_steps}-step schedule")
            break
    swap(params, ema)

    save_pipeline(args.out, vae, text_encoder, tokenizer, unet)
    log(f"saved to {args.out}")


if __name__ == "__main__":
    main()
