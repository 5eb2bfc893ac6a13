"""Benchmark: what one ControlNet adds to a denoising step of an SD-1.5-size UNet, easel (candle)
against PyTorch/diffusers.

Same random weights (SD 1.5's UNet config; a ControlNet made by ControlNetModel.from_unet, as
training starts, its zero-initialised convolutions filled with seeded random values), same
inputs, same machine, same thread count, one run. Each side times a UNet evaluation alone, the
ControlNet alone (what it adds to every step it runs), and a whole step: the ControlNet, then
the UNet with its residuals (as a ControlNet pipeline's step under classifier-free guidance:
batch 2), each the median of --iters after one untimed call; the ratio is easel's over
PyTorch's. Both sides' outputs of the whole step are compared.

    python3 tools/bench/controlnet_vs_diffusers.py [--size 256 --threads 2 --iters 3]

Needs a release build of easel (cargo build --release -p easel-cli) and ~12 GB of free memory.
"""

import os
import tempfile

import torch
from diffusers import ControlNetModel
from safetensors.torch import save_file

from side_by_side import parse_args, relative_l2, run_easel, sd15_unet, time_torch


def main():
    args = parse_args(batch=2)
    with tempfile.TemporaryDirectory() as tmp:
        unet = sd15_unet().eval()
        net = ControlNetModel.from_unet(unet).eval()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for key, p in net.named_parameters():
                if key.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        model_dir = os.path.join(tmp, "sd15-random")
        unet.save_pretrained(os.path.join(model_dir, "unet"), safe_serialization=True)
        net_dir = os.path.join(tmp, "controlnet")
        net.save_pretrained(net_dir, safe_serialization=True)
        net_gb = os.path.getsize(os.path.join(net_dir, "diffusion_pytorch_model.safetensors")) / 1e9

        lat = args.size // 8
        sample = torch.randn(args.batch, 4, lat, lat)
        context = torch.randn(args.batch, 77, 768)
        image = torch.rand(args.batch, 3, args.size, args.size)
        inputs = os.path.join(tmp, "inputs.safetensors")
        save_file({"sample": sample, "context": context, "control_image": image}, inputs)

        def controlled():
            down, mid = net(sample, 500, encoder_hidden_states=context, controlnet_cond=image, conditioning_scale=1.0, return_dict=False)
            return unet(sample, 500, encoder_hidden_states=context, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample

        torch_plain, _ = time_torch(lambda: unet(sample, 500, encoder_hidden_states=context).sample, args.iters)
        torch_net, _ = time_torch(lambda: net(sample, 500, encoder_hidden_states=context, controlnet_cond=image, return_dict=False)[1], args.iters)
        torch_with, ref = time_torch(controlled, args.iters)
        del unet, net

        out_path = os.path.join(tmp, "out.safetensors")
        scratch = os.path.join(tmp, "scratch.safetensors")
        plain, _ = run_easel(args.easel, "unet", model_dir, inputs, args.iters, args.threads, scratch)
        alone, _ = run_easel(args.easel, "unet", model_dir, inputs, args.iters, args.threads, scratch, ["--controlnet", net_dir, "--controlnet-only"])
        with_net, rss = run_easel(args.easel, "unet", model_dir, inputs, args.iters, args.threads, out_path, ["--controlnet", net_dir])
        rel = relative_l2(out_path, ref)

    row = lambda label, e, t: print(f"{label:<24}: easel {e:.3f} s   pytorch {t:.3f} s   ratio easel/pytorch {e / t:.2f}")
    print(f"SD-1.5-size UNet + ControlNet ({net_gb:.2f} GB f32), {args.size}x{args.size}, batch {args.batch}, {args.threads} threads")
    row("UNet alone", plain["eval_s_median"], torch_plain)
    row("ControlNet alone", alone["eval_s_median"], torch_net)
    row("step with the ControlNet", with_net["eval_s_median"], torch_with)
    print(f"output: relative L2 difference {rel:.2e}; easel peak RSS {rss:.2f} GB")


if __name__ == "__main__":
    main()
