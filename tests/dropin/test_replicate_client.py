"""The official `replicate` Python client (1.0.7) against `easel serve`, with only the base URL
changed: replicate.run on an `owner/name` model, predictions with webhooks (validated with the
client's own Standard Webhooks check), waiting, cancel, and errors.

Run by .ci/run after `cargo build`: pytest tests/dropin
"""

import http.server
import json
import threading
import urllib.request

import pytest
import replicate
from replicate.exceptions import ReplicateError

from easel_process import start

TOKEN = "r8_easel_test"


@pytest.fixture(scope="module")
def server():
    proc, base = start(["--api-key", f"team:{TOKEN}:100000", "--allow-private-webhooks", "--signing-secret", "s3cret"])
    yield base
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def client(server):
    return replicate.Client(api_token=TOKEN, base_url=server)


def fetch(url):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    return urllib.request.urlopen(req).read()


def test_run_returns_the_images_of_an_owner_name_model(client):
    # easel serves `tiny`; `easel/tiny` resolves to it, as an owner/name would on Replicate.
    out = client.run("easel/tiny", input={"prompt": "a red circle", "width": 64, "height": 64, "num_inference_steps": 2, "num_outputs": 2, "seed": 3})
    assert isinstance(out, list) and len(out) == 2
    for url in out:
        # Plain http URLs stay strings in the client (https ones become FileOutput).
        assert fetch(str(url))[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_with_owner_name_version_uses_the_version_easel_reports(client):
    p = client.predictions.create(model="easel/tiny", input={"prompt": "a circle", "width": 64, "height": 64, "num_inference_steps": 1})
    p.wait()
    out = client.run(f"easel/tiny:{p.version}", input={"prompt": "a square", "width": 64, "height": 64, "num_inference_steps": 1})
    assert len(out) == 1 and fetch(str(out[0]))[:4] == b"\x89PNG"
    with pytest.raises(ReplicateError) as e:
        client.run("easel/tiny:" + "0" * 64, input={"prompt": "x"})
    assert e.value.status == 404


def test_a_prediction_with_a_webhook_is_waited_for_and_its_webhook_validates(client):
    got = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["content-length"])).decode()
            got.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    hook = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{hook.server_port}/hook"
    p = client.predictions.create(model="easel/tiny", input={"prompt": "a blue square", "aspect_ratio": "1:1", "num_inference_steps": 2, "seed": 4}, webhook=url, webhook_events_filter=["completed"])
    assert p.status == "starting" and p.id
    p.wait()
    assert p.status == "succeeded", p.error
    assert len(p.output) == 1 and p.metrics["predict_time"] > 0
    for _ in range(100):
        if got:
            break
        threading.Event().wait(0.1)
    headers, body = got[0]
    secret = client.webhooks.default.secret()
    assert secret.key.startswith("whsec_")
    client.webhooks.validate(headers=headers, body=body, secret=secret)
    sent = json.loads(body)
    # The same images (each URL is signed when it is written, so its expiry may differ).
    path = lambda urls: [u.split("?")[0] for u in urls]
    assert sent["id"] == p.id and sent["status"] == "succeeded" and path(sent["output"]) == path(p.output)
    hook.shutdown()


def test_cancel_stops_a_prediction(client):
    p = client.predictions.create(model="easel/tiny", input={"prompt": "a slow one", "width": 64, "height": 64, "num_inference_steps": 200})
    p.cancel()
    p.wait()
    assert p.status == "canceled"


def test_bad_input_and_unknown_models_are_replicate_errors(client):
    with pytest.raises(ReplicateError) as e:
        client.run("easel/tiny", input={"prompt": "x", "num_outputs": 50})
    assert e.value.status == 400 and "n" in e.value.detail
    with pytest.raises(ReplicateError) as e:
        client.run("easel/tiny", input={"width": 64})
    assert e.value.status == 400 and "prompt" in e.value.detail
    with pytest.raises(ReplicateError) as e:
        client.run("nobody/nothing", input={"prompt": "x"})
    assert e.value.status == 404


def test_schedulers_easel_lacks_are_refused_as_bad_input(client):
    with pytest.raises(ReplicateError) as e:
        client.run("easel/tiny", input={"prompt": "x", "scheduler": "PNDM"})
    assert e.value.status == 400 and "scheduler" in e.value.detail
