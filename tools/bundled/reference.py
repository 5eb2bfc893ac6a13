"""diffusers' output for the bundled model from fixed init latents, for easel's parity test.

    python3 tools/bundled/reference.py   # writes fixtures/reference/easel-shapes.safetensors
"""

import json
import os

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
PROMPTS = ["a red circle on a blue background", "a yellow triangle on a black background", "a white diamond on a green background"]


def main():
    torch.set_num_threads(2)
    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(ROOT, "models", "easel-shapes"))
    pipe.set_progress_bar_config(disable=True)
    defaults = json.load(open(os.path.join(ROOT, "models", "easel-shapes", "easel.json")))
    torch.manual_seed(77)
    init = torch.randn(len(PROMPTS), 4, 16, 16)
    with torch.no_grad():
        lat = pipe(PROMPTS, num_inference_steps=defaults["steps"], guidance_scale=defaults["guidance"], latents=init.clone(), height=64, width=64, output_type="latent").images
        img = pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample
        img = (img / 2 + 0.5).clamp(0, 1)
    meta = {"prompts": json.dumps(PROMPTS), "steps": str(defaults["steps"]), "guidance": str(defaults["guidance"])}
    save_file({"init_latents": init, "latents": lat.contiguous(), "image": img.contiguous()}, os.path.join(ROOT, "fixtures", "reference", "easel-shapes.safetensors"), metadata=meta)


if __name__ == "__main__":
    main()
