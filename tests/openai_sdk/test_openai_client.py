"""The official `openai` Python SDK against a running `easel serve`, with only base_url changed.

Run by .ci/run after `cargo build`: pytest tests/openai_sdk
"""

import base64

import openai
import pytest

from easel_process import start


@pytest.fixture(scope="module")
def server():
    proc, base = start()
    yield base
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_b64_json(client):
    r = client.images.generate(model="tiny", prompt="a red circle", size="64x64", response_format="b64_json", extra_body={"steps": 2, "seed": 3})
    png = base64.b64decode(r.data[0].b64_json)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert r.created > 0
    assert r.model_extra["easel"]["seeds"] == [3]


def test_url_and_n(client):
    r = client.images.generate(model="tiny", prompt="a blue square", size="64x64", n=2, response_format="url", extra_body={"steps": 2})
    assert len(r.data) == 2
    import urllib.request

    for d in r.data:
        assert urllib.request.urlopen(d.url).read()[:8] == b"\x89PNG\r\n\x1a\n"


def test_models_list(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["tiny"]


def test_bad_parameter_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="tiny", prompt="x", n=20)
    assert e.value.status_code == 400
    assert e.value.body["param"] == "n"


def test_unknown_model_raises_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.images.generate(model="dall-e-42", prompt="x")
    assert e.value.body["code"] == "model_not_found"


def test_authentication():
    proc, base = start(["--api-key", "ci:topsecret"])
    try:
        bad = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.images.generate(model="tiny", prompt="x", size="64x64")
        good = openai.OpenAI(base_url=base + "/v1", api_key="topsecret", max_retries=0, timeout=300)
        r = good.images.generate(model="tiny", prompt="x", size="64x64", extra_body={"steps": 1})
        assert r.data[0].b64_json
    finally:
        proc.kill()
        proc.wait()


def _png(width, height, alpha=None):
    """A PNG made with the standard library: RGB, or RGBA with `alpha(x, y)`."""
    import struct
    import zlib

    channels = 3 if alpha is None else 4
    rows = b""
    for y in range(height):
        row = b"\x00"
        for x in range(width):
            px = bytes([(x * 5) % 256, 90, (y * 7) % 256])
            row += px if alpha is None else px + bytes([alpha(x, y)])
        rows += row

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2 if alpha is None else 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_images_edit_with_and_without_a_mask(client):
    picture = ("photo.png", _png(48, 32), "image/png")
    # No mask: the whole picture is reworked (image-to-image); the result keeps its size.
    r = client.images.edit(model="tiny", image=picture, prompt="a watercolour", response_format="b64_json", extra_body={"steps": 3, "seed": 5, "strength": 0.6})
    png = base64.b64decode(r.data[0].b64_json)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import struct

    assert struct.unpack(">II", png[16:24]) == (48, 32), "the picture's size"
    # OpenAI's mask: transparent pixels are edited.
    mask = ("mask.png", _png(48, 32, alpha=lambda x, y: 0 if x >= 24 else 255), "image/png")
    r = client.images.edit(model="tiny", image=picture, mask=mask, prompt="a red chair", n=2, response_format="b64_json", extra_body={"steps": 3, "seed": 5})
    assert len(r.data) == 2


def test_images_edit_uses_the_pictures_transparency_without_a_mask(client):
    # As OpenAI's dall-e-2 edits: with no mask, the fully transparent pixels are the region to edit.
    holed = ("holed.png", _png(48, 32, alpha=lambda x, y: 0 if 8 <= x < 24 else 255), "image/png")
    r = client.images.edit(model="tiny", image=holed, prompt="a window", response_format="b64_json", extra_body={"steps": 3, "seed": 2})
    assert base64.b64decode(r.data[0].b64_json)[:8] == b"\x89PNG\r\n\x1a\n"
    import json
    import urllib.request

    job = json.load(urllib.request.urlopen(f"{client.base_url}jobs/{r.model_extra['easel']['job_id']}"))
    assert job["request"]["init_image"] == {"digest": job["request"]["init_image"]["digest"], "strength": 1.0, "mask": True}, job["request"]


def test_images_edit_bad_input_raises_bad_request(client):
    picture = ("photo.png", _png(48, 32), "image/png")
    cases = [
        (dict(image=("junk.png", b"not a picture", "image/png")), "image"),
        (dict(image=picture, mask=("mask.png", _png(48, 32), "image/png")), "mask"),  # no alpha channel
        (dict(image=picture, mask=("mask.png", _png(32, 32, alpha=lambda x, y: 0), "image/png")), "mask"),  # another size
        (dict(image=[picture, picture]), "image"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.images.edit(model="tiny", prompt="x", **kwargs)
        assert e.value.body["param"] == param, e.value.body
