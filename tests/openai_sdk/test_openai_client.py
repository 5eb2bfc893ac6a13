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
