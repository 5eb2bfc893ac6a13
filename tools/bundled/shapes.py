"""The easel-shapes dataset: one coloured shape on a plain background, with a caption.

Deterministic from a seed. The palette, shapes, caption templates and held-out combinations
live in shapes.json, which the Rust quality checker reads too.
"""

import json
import math
import os
import random

import numpy as np
from PIL import Image, ImageDraw

SPEC = json.load(open(os.path.join(os.path.dirname(__file__), "shapes.json")))
SIZE = SPEC["size"]
COLORS = SPEC["colors"]
SHAPES = SPEC["shapes"]
HELD_OUT = {tuple(x) for x in SPEC["held_out"]}


def all_combos():
    return [(c, s, b) for c in COLORS for s in SHAPES for b in COLORS if b != c]


def train_combos():
    return [x for x in all_combos() if x not in HELD_OUT]


def shape_polygon(shape, cx, cy, r):
    """Vertices of a shape of 'radius' r centred at (cx, cy); None for a circle."""
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    return None


def render(color, shape, background, cx, cy, r):
    img = Image.new("RGB", (SIZE, SIZE), tuple(COLORS[background]))
    d = ImageDraw.Draw(img)
    poly = shape_polygon(shape, cx, cy, r)
    if poly is None:
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(COLORS[color]))
    else:
        d.polygon(poly, fill=tuple(COLORS[color]))
    return np.asarray(img)


def sample(rng, combos):
    color, shape, background = rng.choice(combos)
    r = rng.randint(10, 20)
    cx = rng.randint(r + 2, SIZE - r - 3)
    cy = rng.randint(r + 2, SIZE - r - 3)
    caption = fill(rng.choice(SPEC["templates"]), color, shape, background)
    return render(color, shape, background, cx, cy, r), caption, (color, shape, background)


def dataset(seed, n, combos=None):
    rng = random.Random(seed)
    combos = combos or train_combos()
    images, captions, labels = [], [], []
    for _ in range(n):
        img, cap, lab = sample(rng, combos)
        images.append(img)
        captions.append(cap)
        labels.append(lab)
    return np.stack(images), captions, labels


def fill(template, color, shape, background):
    article = "an" if color[0] in "aeiou" else "a"
    return template.format(a=article, color=color, shape=shape, background=background)


def prompt(color, shape, background):
    """The canonical prompt for a combination (the first template)."""
    return fill(SPEC["templates"][0], color, shape, background)


if __name__ == "__main__":
    imgs, caps, _ = dataset(0, 16)
    grid = np.concatenate([np.concatenate(list(imgs[i * 4 : i * 4 + 4]), axis=1) for i in range(4)], axis=0)
    Image.fromarray(grid).save("/tmp/shapes-grid.png")
    print("\n".join(caps))
