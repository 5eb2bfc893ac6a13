"""Starting `easel serve` for the Python client tests: the binary .ci/run built, the tiny SD 1.5
fixture as model `tiny`, a fresh data dir, and the address read from its first line."""

import os
import re
import subprocess
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
EASEL = os.environ.get("EASEL_BIN", os.path.join(ROOT, "target", "debug", "easel"))
TINY = os.path.join(ROOT, "fixtures", "pipelines", "sd15-tiny")


def start(extra=(), model=f"tiny={TINY}"):
    """Returns the process and its base URL (http://127.0.0.1:PORT); model None serves the
    bundled model."""
    data = tempfile.mkdtemp()
    models = ["--model", model] if model else []
    proc = subprocess.Popen(
        [EASEL, "serve", "--listen", "127.0.0.1:0", "--data-dir", data, *models, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    banner = proc.stdout.readline()
    m = re.search(r"http://\S+", banner)
    assert m, banner
    return proc, m.group(0)
