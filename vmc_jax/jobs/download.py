"""``vmc-jax download``: the released weights of each cascade stage from the Hugging Face Hub, converted.

Only what the converter reads is fetched: configs, tokenizer files and fp16 safetensors (a part
without an fp16 file gets its full-precision safetensors). huggingface_hub keeps the files in its
cache (``HF_HUB_CACHE``), resumes a cut download, and reads the token from ``HF_TOKEN`` or
``hf auth login``; with ``HF_HUB_OFFLINE=1`` a filled cache is enough, no network is asked.
"""

from __future__ import annotations

import fnmatch
import os
from typing import Sequence

from huggingface_hub import snapshot_download
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

from vmc_jax.errors import JobError
from vmc_jax.jobs.convert import convert

# cascade stage -> the Hub repositories it needs (sr1: IF-II-L for the first frame, then Show-1's sr1).
STAGE_REPOSITORIES = {
    "keyframes": ("showlab/show-1-base",),
    "interpolation": ("showlab/show-1-interpolation",),
    "sr1": ("DeepFloyd/IF-II-L-v1.0", "showlab/show-1-sr1"),
    "sr2": ("showlab/show-1-sr2",),
}
# The job config field each repository's converted folder goes to.
CONFIG_FIELDS = {"showlab/show-1-base": "pretrained", "showlab/show-1-interpolation": "cascade.interpolation",
                 "DeepFloyd/IF-II-L-v1.0": "cascade.sr1_image", "showlab/show-1-sr1": "cascade.sr1",
                 "showlab/show-1-sr2": "cascade.sr2"}
WANTED = ["*.json", "*.txt", "*.model", "*.fp16.safetensors"]  # fnmatch over repository paths
WEIGHTS = ("*.safetensors",)


def download(dst: str, stages: Sequence[str] = tuple(STAGE_REPOSITORIES), overwrite: bool = False) -> dict[str, str]:
    """Fetches the repositories of ``stages`` (all of them before anything is written), then converts
    each into ``dst/<repository name>``; returns config field -> converted folder (``--config.<field>``)."""
    unknown = [s for s in stages if s not in STAGE_REPOSITORIES]
    if unknown:
        raise ValueError(f"--stages: unknown stage {unknown[0]!r} (stages: {', '.join(STAGE_REPOSITORIES)})")
    snapshots = {repo: fetch(repo) for repo in dict.fromkeys(r for s in stages for r in STAGE_REPOSITORIES[s])}
    folders = {}
    for repo, snapshot in snapshots.items():
        folders[CONFIG_FIELDS[repo]] = os.path.join(dst, repo.split("/")[1])
        convert(snapshot, folders[CONFIG_FIELDS[repo]], overwrite=overwrite)
    return folders


def fetch(repo: str) -> str:
    """The local snapshot folder of ``repo`` with the files the converter reads (downloaded if need be)."""
    snapshot = _snapshot(repo, WANTED)
    lacking = [folder for folder in _model_folders(snapshot) if not _has_weights(folder)]
    if lacking:  # no fp16 file in these parts: their full-precision safetensors
        parts = [os.path.relpath(f, snapshot) for f in lacking]
        snapshot = _snapshot(repo, [f"{p}/{w}" for p in parts for w in WEIGHTS])
        still = [p for p in parts if not _has_weights(os.path.join(snapshot, p))]
        if still:
            raise JobError(f"{repo}: no safetensors weights in {', '.join(still)} (a .bin checkpoint is not read "
                           "unconverted: convert it with `vmc-jax convert` from a local copy)")
    return snapshot


def _snapshot(repo: str, patterns: list[str]) -> str:
    try:
        return snapshot_download(repo, allow_patterns=patterns)
    except GatedRepoError:
        raise JobError(f"{repo} is gated: accept its licence at https://huggingface.co/{repo} while logged in, "
                       "then make the token available (`hf auth login`, or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise JobError(f"{repo}: no such repository on the Hub, or a private one this token cannot read") from None
    except LocalEntryNotFoundError:
        raise JobError(f"{repo}: not in the local Hugging Face cache, and the Hub cannot be asked (offline: "
                       "HF_HUB_OFFLINE=1, or no network); run once online to fill the cache") from None


def _model_folders(snapshot: str) -> list[str]:
    """The folders of ``snapshot`` holding a model's config.json beside where its weights belong."""
    found = []
    for folder, _, names in os.walk(snapshot):
        if "config.json" in names and not {"tokenizer_config.json", "scheduler_config.json"} & set(names):
            found.append(folder)
    return sorted(found)


def _has_weights(folder: str) -> bool:
    return os.path.isdir(folder) and any(fnmatch.fnmatch(n, w) for n in os.listdir(folder) for w in WEIGHTS)
