"""The commands that README.md and docs/ show, as a reader copies them: each `vmc-jax` line names a
command, its flags and config fields that exist (and a config file and argument that load); each
script or benchmark exists and takes the flags given. The demos themselves run in
tests/end_to_end (test_cli_end_to_end.py, test_world_demo.py)."""

import functools
import glob
import importlib.util
import os
import re
import shlex

import pytest
from helpers import REPO

from vmc_jax import cli
from vmc_jax.jobs.config import field_check

PAGES = [os.path.join(REPO, "README.md"), *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]


def shown_commands(page: str) -> list[str]:
    """The commands in the page's code blocks, continuation lines joined, comments and outputs left out."""
    commands, block, fenced = [], [], False
    for line in open(page, encoding="utf-8").read().splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if not (fenced or line.startswith("    ")):
            continue
        text = line.strip()
        if block:
            block.append(text)
        elif text.startswith(("vmc-jax ", "bash ", "python ", "pip ")):  # not "vmc-jax: stopped ...", an output
            block = [text]
        if block and not text.endswith("\\"):
            commands.append(" ".join(part.rstrip("\\").strip() for part in block))
            block = []
    last_parts = [re.sub(r"\s+#.*$", "", command).split(" && ")[-1] for command in commands]
    return [command for command in last_parts if not command.startswith("pip ")]  # installs are not checked


SHOWN = [(os.path.relpath(page, REPO), command) for page in PAGES for command in shown_commands(page)]


@functools.lru_cache(maxsize=None)
def load_config(spec: str):
    """The ConfigDict of ``FILE[:ARG]`` (relative to the repository), as `--config` loads it."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("shown_config", os.path.join(REPO, path))
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(*([arg] if arg else []))


def flag_names(tokens: list[str]) -> list[str]:
    return [token[2:].split("=", 1)[0] for token in tokens if token.startswith("--")]


def test_the_pages_show_the_main_commands():
    shown = {command for _, command in SHOWN}
    assert {"bash scripts/demo_world.sh workdirs/world", "bash scripts/demo_tiny.sh workdirs/tiny",
            "python -m pytest -q tests"} <= shown
    assert sum(command.startswith("vmc-jax ") for command in shown) >= 10


@pytest.mark.parametrize("page, command", [pair for pair in SHOWN if pair[1].startswith("vmc-jax ")],
                         ids=lambda value: value if value.endswith(".md") else value[:60])
def test_a_shown_vmc_jax_command_names_real_flags_and_fields(page, command):
    tokens = [token for token in shlex.split(command) if token != "..." and not token.startswith("[")]
    name = tokens[1]
    assert name in cli.COMMANDS, f"{page}: {command}"
    allowed = set(cli.COMMANDS[name][2]) | {"help", "verbose"}
    config_spec = next((t.split("=", 1)[1] for t in tokens if t.startswith("--config=")),
                       tokens[tokens.index("--config") + 1] if "--config" in tokens else None)
    if config_spec is not None:
        config = load_config(config_spec)  # the file exists and takes the argument
    for flag in flag_names(tokens):
        if flag.startswith("config."):
            field = flag[len("config."):]
            if name == "world-pretrain":  # its own config file's fields
                node = config
                for part in field.split("."):
                    assert part in node, f"{page}: {command}: --{flag}"
                    node = node[part]
            else:
                assert field_check(field) is not None, f"{page}: {command}: --{flag} is no job config field"
        elif flag != "config":
            assert flag in allowed, f"{page}: {command}: --{flag} is no flag of `vmc-jax {name}`"


@pytest.mark.parametrize("page, command", [pair for pair in SHOWN if not pair[1].startswith("vmc-jax ")],
                         ids=lambda value: value if value.endswith(".md") else value[:60])
def test_a_shown_script_exists_and_takes_its_flags(page, command):
    tokens = shlex.split(command)
    if tokens[:2] == ["python", "-m"]:
        assert tokens[2] == "pytest", f"{page}: {command}"
        return
    script = os.path.join(REPO, tokens[1])
    assert os.path.isfile(script), f"{page}: {command}: no {tokens[1]}"
    source = open(script, encoding="utf-8").read()
    for flag in flag_names(tokens[2:]):
        assert f'"--{flag}"' in source or f"--{flag}" in source.split("usage", 1)[-1], \
            f"{page}: {command}: {tokens[1]} takes no --{flag}"
