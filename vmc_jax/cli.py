"""The ``vmc-jax`` command.

    vmc-jax convert SRC DST [--overwrite]         hub pipeline or model folder -> Flax checkpoints
    vmc-jax tiny-pipeline DST [STAGES_DST]        write a small random Show-1 pipeline (hub format),
                                                  and tiny pipelines of the later cascade stages
    vmc-jax train --config configs/vmc.py[:clip] --workdir W [--config.<field>=<value> ...]
    vmc-jax generate --workdir W --prompt "..." [--prompt "..."] [--stages keyframes,interpolation,sr1,sr2]
    vmc-jax export --workdir W --out FILE.safetensors              the tuned delta, PyTorch names
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import ConfigDict, config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file, optionally with :arg.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The job's folder: config, checkpoints, metrics, samples.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt to generate (repeatable).")
_OUT = flags.DEFINE_string("out", None, "The file `export` writes.")
_STAGES = flags.DEFINE_list("stages", None, "`generate`: cascade stages, e.g. keyframes,interpolation,sr1,sr2 "
                            "(default: keyframes and every stage config.cascade gives a folder for).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "`convert`: replace existing converted components.")

COMMANDS = ("convert", "tiny-pipeline", "train", "generate", "export")


def _job_config() -> ConfigDict:
    """--config if given, else the config the workdir's training run saved."""
    if _CONFIG.value is not None:
        return _CONFIG.value
    path = os.path.join(_require(_WORKDIR, "workdir"), "config.json")
    if not os.path.isfile(path):
        raise app.UsageError(f"no --config given and no {path} (run `vmc-jax train` first)")
    with open(path, encoding="utf-8") as f:
        return ConfigDict(json.load(f))


def _require(flag, name: str):
    if not flag.value:
        raise app.UsageError(f"--{name} is required")
    return flag.value


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: vmc-jax {{{','.join(COMMANDS)}}} ...; see `vmc-jax --help`")
    command, args = argv[1], argv[2:]
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax reports every file it writes
    if command == "convert":
        if len(args) != 2:
            raise app.UsageError("usage: vmc-jax convert SRC DST")
        from vmc_jax.conversion.pipeline import convert

        convert(*args, overwrite=_OVERWRITE.value)
    elif command == "tiny-pipeline":
        if len(args) not in (1, 2):
            raise app.UsageError("usage: vmc-jax tiny-pipeline DST [STAGES_DST]")
        from vmc_jax.tiny_pipeline import make_tiny_cascade, make_tiny_pipeline

        print(make_tiny_pipeline(args[0]))
        for path in make_tiny_cascade(args[1]).values() if len(args) == 2 else ():
            print(path)
    elif command == "train":
        from vmc_jax.train import train_and_evaluate

        if _CONFIG.value is None:
            raise app.UsageError("--config is required")
        train_and_evaluate(_CONFIG.value, _require(_WORKDIR, "workdir"))
    elif command == "generate":
        from vmc_jax.train import generate_prompts

        for path in generate_prompts(_job_config(), _require(_WORKDIR, "workdir"), _PROMPT.value, _STAGES.value):
            print(path)
    else:
        from vmc_jax.train import export_tuned

        print(export_tuned(_job_config(), _require(_WORKDIR, "workdir"), _require(_OUT, "out")))


def run() -> None:
    """Console entry point."""
    app.run(main, argv=sys.argv)
