"""The package's layers import only downwards: base < kernels < models < hub < library < jobs < cli."""

import ast
import os

import pytest
from helpers import REPO

PACKAGE = os.path.join(REPO, "vmc_jax")
# Lowest first; a module may import its own layer and those below.
LAYERS = {
    "base": ("vmc_jax.errors", "vmc_jax.files"),
    "kernels": ("vmc_jax.kernels",),
    "models": ("vmc_jax.models",),
    "hub": ("vmc_jax.hub",),
    "library": ("vmc_jax.schedulers", "vmc_jax.sampling", "vmc_jax.keyframe_sampling", "vmc_jax.cascade",
                "vmc_jax.training", "vmc_jax.parallel", "vmc_jax.video_io", "vmc_jax.world",
                "vmc_jax.world_evaluation", "vmc_jax.clip_metrics", "vmc_jax.prompts", "vmc_jax.peers"),
    "jobs": ("vmc_jax.jobs",),
    "front": ("vmc_jax.cli", "vmc_jax"),
}
RANK = {name: i for i, name in enumerate(LAYERS)}


def layer_of(module: str) -> str:
    """The layer of a dotted vmc_jax module (the longest prefix that names one)."""
    best = max(((prefix, layer) for layer, prefixes in LAYERS.items() for prefix in prefixes
                if module == prefix or module.startswith(prefix + ".")), key=lambda p: len(p[0]))
    return best[1]


def modules() -> dict[str, str]:
    """Dotted name -> file of every module of the package."""
    found = {}
    for folder, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                found[rel.removesuffix(".__init__")] = os.path.join(folder, name)
    return found


def imports_of(path: str, module: str) -> set[str]:
    """The vmc_jax modules ``path`` imports (``from vmc_jax import x`` counts as vmc_jax.x)."""
    known = modules()
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("vmc_jax")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vmc_jax"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in known else node.module)
    return out - {module}


@pytest.mark.parametrize("module", sorted(modules()))
def test_imports_go_downwards_only(module):
    upward = sorted(m for m in imports_of(modules()[module], module) if RANK[layer_of(m)] > RANK[layer_of(module)])
    assert not upward, f"{module} ({layer_of(module)}) imports from a higher layer: {upward}"


def test_every_module_has_a_layer():
    assert all(layer_of(m) for m in modules())
