"""fal's official Python client (fal-client 1.0.3) against easel's fal-shaped queue.

fal's client speaks https only and takes its queue host from FAL_QUEUE_RUN_HOST (read when it is
imported), so the test puts a small TLS proxy with a self-signed certificate in front of easel,
as a deployment would put easel behind TLS, and points the client at `127.0.0.1:PORT/fal`.
Everything else is the client's own: submit, status polling, result, cancel, and following the
status/response/cancel URLs easel returns.

Run by .ci/run after `cargo build`: pytest tests/dropin
"""

import http.server
import importlib
import os
import ssl
import subprocess
import tempfile
import threading
import urllib.error
import urllib.request

import pytest

from easel_process import start

KEY = "fal-easel-test"


class Proxy(http.server.BaseHTTPRequestHandler):
    """Forwards every request to easel over http, keeping Host, adding X-Forwarded-Proto."""

    upstream = ""

    def forward(self):
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else None
        req = urllib.request.Request(self.upstream + self.path, data=body, method=self.command)
        for k, v in self.headers.items():
            if k.lower() not in ("connection", "content-length"):
                req.add_header(k, v)
        req.add_header("X-Forwarded-Proto", "https")
        try:
            resp = urllib.request.urlopen(req)
        except urllib.error.HTTPError as e:
            resp = e
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.headers.items():
            if k.lower() not in ("connection", "content-length", "transfer-encoding"):
                self.send_header(k, v)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = forward

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def fal():
    proc, base = start(["--api-key", f"team:{KEY}:100000"])
    certs = tempfile.mkdtemp()
    cert, key = os.path.join(certs, "cert.pem"), os.path.join(certs, "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    Proxy.upstream = base
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    proxy.socket = tls.wrap_socket(proxy.socket, server_side=True)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    os.environ.update({"FAL_QUEUE_RUN_HOST": f"127.0.0.1:{proxy.server_port}/fal", "FAL_KEY": KEY, "SSL_CERT_FILE": cert})
    import fal_client

    importlib.reload(fal_client.client)
    yield fal_client.SyncClient(key=KEY)
    proxy.shutdown()
    proc.kill()
    proc.wait()


def test_subscribe_returns_fal_shaped_images(fal):
    updates = []
    result = fal.subscribe(
        "easel/tiny",
        arguments={"prompt": "a red circle", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 2, "num_images": 2, "seed": 9},
        with_logs=True,
        on_queue_update=updates.append,
    )
    assert len(result["images"]) == 2 and result["seed"] == 9 and result["prompt"] == "a red circle"
    assert result["has_nsfw_concepts"] == [False, False]
    for img in result["images"]:
        assert (img["width"], img["height"], img["content_type"]) == (64, 64, "image/png")
        # A signed URL under the host the client reached, so it opens without a key.
        tls = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
        assert urllib.request.urlopen(img["url"], context=tls).read()[:8] == b"\x89PNG\r\n\x1a\n"
    assert updates, "status updates were polled"
    assert type(updates[-1]).__name__ == "Completed"


def test_submit_status_result_and_cancel_follow_the_returned_urls(fal):
    handle = fal.submit("easel/tiny", arguments={"prompt": "a blue square", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 2})
    assert handle.request_id.startswith("job_")
    result = handle.get()
    assert len(result["images"]) == 1
    assert type(handle.status()).__name__ == "Completed"
    slow = fal.submit("easel/tiny", arguments={"prompt": "a slow one", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 200})
    slow.cancel()
    for _ in range(200):
        status = slow.status()
        if type(status).__name__ == "Completed":
            break
        threading.Event().wait(0.1)
    assert type(status).__name__ == "Completed"
    with pytest.raises(Exception) as e:
        slow.get()
    assert "cancel" in str(e.value).lower()


def test_bad_arguments_are_fal_errors(fal):
    import fal_client

    with pytest.raises(fal_client.client.FalClientHTTPError) as e:
        fal.submit("easel/tiny", arguments={"image_size": "square"})
    assert e.value.status_code == 400 and "prompt" in str(e.value)


def test_pictures_go_in_as_data_uris_for_image_to_image_and_inpainting(fal):
    import fal_client
    from PIL import Image

    picture = Image.new("RGB", (48, 32), (200, 40, 40))
    mask = Image.new("L", (48, 32), 0)
    mask.paste(255, (16, 8, 40, 24))
    image_url = fal_client.encode_image(picture, format="png")
    assert image_url.startswith("data:image/png;base64,")
    edited = fal.subscribe("easel/tiny", arguments={"prompt": "a red door", "image_url": image_url, "strength": 0.5, "num_inference_steps": 4, "seed": 3})
    # The result has the picture's size, as fal's image-to-image apps answer.
    assert [(i["width"], i["height"]) for i in edited["images"]] == [(48, 32)]
    filled = fal.subscribe("easel/tiny", arguments={"prompt": "a red door", "image_url": image_url, "mask_url": fal_client.encode_image(mask, format="png"), "num_inference_steps": 4, "seed": 3})
    assert [(i["width"], i["height"]) for i in filled["images"]] == [(48, 32)]
    with pytest.raises(fal_client.client.FalClientHTTPError) as e:
        fal.submit("easel/tiny", arguments={"prompt": "a red door", "image_url": "https://example.com/door.png"})
    assert e.value.status_code == 400 and "image_url" in str(e.value)
