"""Stores the bundled text encoder's token-embedding table in float16, the rest in float32.

    python3 tools/bundled/half_token_table.py [models/easel-shapes/text_encoder/model.safetensors]

Why: the table (49408 tokens x 32) is 6.3 MB of the bundled model's 15 MB in float32, and the
repository shares a size budget with what a GPU check carries (tools/gpu/payload.sh). Only the
few hundred tokens of the shapes vocabulary were trained; float16 keeps their values to 3
significant digits (relative rounding under 5e-4), and both easel and diffusers widen the table
to the model's float32 when they load it. train.py saves new checkpoints the same way.
"""

import os
import sys

import numpy as np
from safetensors.numpy import load_file, save_file

TABLE = "text_model.embeddings.token_embedding.weight"


def half_token_table(path):
    tensors = load_file(path)
    if tensors[TABLE].dtype != np.float16:
        tensors[TABLE] = tensors[TABLE].astype(np.float16)
        save_file(tensors, path, metadata={"format": "pt"})
    return path


if __name__ == "__main__":
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "models", "easel-shapes", "text_encoder", "model.safetensors")
    print(half_token_table(path), os.path.getsize(path))
