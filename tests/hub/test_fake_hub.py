"""The fake hub (crates/easel-fakehub) checked with huggingface_hub itself, and the hub cache
shared between the Python client and easel both ways.

The Rust tests of easel-hub trust the fake; this file is why: the official client downloads,
resolves metadata and raises its own typed errors against it exactly as against the real hub.
Run by .ci/run after `cargo build`: pytest tests/hub
"""

import filecmp
import os
import subprocess

import huggingface_hub
import pytest
from huggingface_hub import errors

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.path.join(ROOT, "target", "debug")
TINY = os.path.join(ROOT, "fixtures", "pipelines", "sd15-tiny")


@pytest.fixture(scope="module")
def hub():
    proc = subprocess.Popen(
        [
            os.path.join(BIN, "easel-fakehub"),
            "--repo", f"acme/sd-tiny={TINY}",
            "--repo", f"acme/gated={TINY}",
            "--gated", "acme/gated",
            "--token", "hf_granted", "--token", "hf_other",
            "--grant", "acme/gated=hf_granted",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    words = proc.stdout.readline().split()
    assert words[0] == "hub", words
    yield {"endpoint": words[1], "cdn": words[3]}
    proc.stdin.close()
    proc.wait(timeout=10)


def tree(folder):
    return sorted(
        os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder) for f in files
    )


def test_snapshot_download_gets_every_file_byte_for_byte(hub, tmp_path):
    path = huggingface_hub.snapshot_download("acme/sd-tiny", endpoint=hub["endpoint"], cache_dir=tmp_path, token=False)
    assert tree(path) == tree(TINY)
    _, mismatch, errs = filecmp.cmpfiles(path, TINY, tree(TINY), shallow=False)
    assert mismatch == [] and errs == []


def test_lfs_metadata_names_the_sha256_and_the_cdn(hub):
    url = huggingface_hub.hf_hub_url("acme/sd-tiny", "unet/diffusion_pytorch_model.safetensors", endpoint=hub["endpoint"])
    meta = huggingface_hub.get_hf_file_metadata(url, token=False)
    assert meta.location.startswith(hub["cdn"])
    assert len(meta.etag) == 64 and len(meta.commit_hash) == 40
    assert meta.size == os.path.getsize(os.path.join(TINY, "unet", "diffusion_pytorch_model.safetensors"))


def test_gated_private_unknown_and_missing_raise_the_clients_own_errors(hub, tmp_path):
    def get(repo, name="model_index.json", token=False, revision=None):
        return huggingface_hub.hf_hub_download(repo, name, endpoint=hub["endpoint"], cache_dir=tmp_path, token=token, revision=revision)

    with pytest.raises(errors.GatedRepoError):
        get("acme/gated")
    with pytest.raises(errors.GatedRepoError):
        get("acme/gated", token="hf_other")
    assert os.path.exists(get("acme/gated", token="hf_granted"))
    with pytest.raises(errors.RepositoryNotFoundError):
        get("acme/nope")
    with pytest.raises(errors.RepositoryNotFoundError):
        get("acme/nope", token="hf_other")
    with pytest.raises(errors.EntryNotFoundError):
        get("acme/sd-tiny", "unet/missing.safetensors")
    with pytest.raises(errors.RevisionNotFoundError):
        get("acme/sd-tiny", revision="v9")


def easel(hub, home, *args, offline=False):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub["endpoint"], HF_HOME=str(home))
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    out = subprocess.run([os.path.join(BIN, "easel"), *args], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out


def test_a_cache_filled_by_either_client_serves_the_other_and_gives_the_same_image(hub, tmp_path):
    py_home, easel_home = tmp_path / "py", tmp_path / "easel"
    # Python fills one cache; easel runs from it offline.
    huggingface_hub.snapshot_download("acme/sd-tiny", endpoint=hub["endpoint"], cache_dir=py_home / "hub", token=False)
    args = ("generate", "--model", "acme/sd-tiny", "a red circle", "--seed", "5", "--steps", "3")
    easel(hub, py_home, *args, "-o", str(tmp_path / "py.png"), "--save-latents", str(tmp_path / "py.safetensors"), offline=True)
    # easel fills another; Python reads its files offline.
    easel(hub, easel_home, *args, "-o", str(tmp_path / "easel.png"), "--save-latents", str(tmp_path / "easel.safetensors"))
    path = huggingface_hub.hf_hub_download(
        "acme/sd-tiny", "unet/config.json", cache_dir=easel_home / "hub", local_files_only=True
    )
    assert filecmp.cmp(path, os.path.join(TINY, "unet", "config.json"), shallow=False)
    # The same final latents, so the same image, whichever client filled the cache.
    assert filecmp.cmp(tmp_path / "py.safetensors", tmp_path / "easel.safetensors", shallow=False)
