"""`vmc-jax download` against a local cache laid out as huggingface_hub lays it out (no network),
and its refusals: a gated repository, one missing from an offline cache, a part without safetensors."""

import os
import subprocess
import sys
from unittest import mock

import pytest
from helpers import REPO
from huggingface_hub.errors import GatedRepoError

from vmc_jax.errors import JobError
from vmc_jax.hub.tiny_pipeline import make_tiny_pipeline
from vmc_jax.jobs import download

REVISION = "0123456789abcdef0123456789abcdef01234567"


def cached_snapshot(cache, repo: str) -> str:
    """The snapshot folder of ``repo``'s main revision in the hub cache ``cache`` (refs/main names it)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(REVISION)
    return str(root / "snapshots" / REVISION)


def vmc_jax_offline(cache, *args):
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-m", "vmc_jax.cli", "download", *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env=env)


def test_download_converts_from_a_filled_cache_offline_and_refuses_what_is_not_there(tmp_path):
    cache = tmp_path / "hub"
    make_tiny_pipeline(cached_snapshot(cache, "showlab/show-1-base"))
    result = vmc_jax_offline(cache, str(tmp_path / "models"), "--stages", "keyframes")
    assert result.returncode == 0, result.stderr
    assert f"--config.pretrained={tmp_path / 'models' / 'show-1-base'}" in result.stdout.splitlines()[-1]
    assert os.path.isfile(tmp_path / "models" / "show-1-base" / "unet" / "config.json")

    missing = vmc_jax_offline(cache, str(tmp_path / "more"), "--stages", "keyframes,interpolation")
    assert missing.returncode == 2
    assert missing.stderr.splitlines() == [
        "vmc-jax: error: showlab/show-1-interpolation: not in the local Hugging Face cache, and the Hub cannot be "
        "asked (offline: HF_HUB_OFFLINE=1, or no network); run once online to fill the cache"]
    assert not (tmp_path / "more").exists()  # fetched all before writing anything


def test_a_gated_repository_says_what_to_accept_and_where_the_token_goes(monkeypatch):
    def gated(repo, **_):  # what huggingface_hub raises for a 403 on a gated repository
        raise GatedRepoError(f"Access to model {repo} is restricted", response=mock.Mock(status_code=403))

    monkeypatch.setattr(download, "snapshot_download", gated)
    with pytest.raises(JobError, match=r"^DeepFloyd/IF-II-L-v1.0 is gated: accept its licence at "
                                       r"https://huggingface.co/DeepFloyd/IF-II-L-v1.0 .*HF_TOKEN"):
        download.download("unused", ["sr1"])


def test_a_part_without_fp16_weights_gets_its_safetensors_and_without_any_is_named(tmp_path, monkeypatch):
    snapshot = tmp_path / "snapshot"
    make_tiny_pipeline(str(snapshot))
    asked = []

    def cached(repo, allow_patterns):
        asked.append(allow_patterns)
        return str(snapshot)

    monkeypatch.setattr(download, "snapshot_download", cached)
    assert download.fetch("showlab/show-1-base") == str(snapshot)
    assert asked == [download.WANTED]  # every part has its weights: one request
    os.remove(snapshot / "unet" / "diffusion_pytorch_model.safetensors")
    asked.clear()
    with pytest.raises(JobError, match=r"^showlab/show-1-base: no safetensors weights in unet "):
        download.fetch("showlab/show-1-base")
    assert asked == [download.WANTED, ["unet/*.safetensors"]]
