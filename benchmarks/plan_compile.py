"""Compile time per program of a job for a target (`vmc_jax.jobs.plan`), one compile at a time, as JSON.

    PYTHONPATH=. python benchmarks/plan_compile.py --config configs/vmc.py:car_forest --target v5e:2x2 \\
        --stages train,keyframes --out benchmarks/plan_compile_v5e.json

TPU targets need libtpu (`pip install -e ".[tpu]"`). The config's model folders may be missing:
their real configs (configs/models) are used. Each row also carries the plan's memory and cost.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys

import jax

from vmc_jax import files
from vmc_jax.jobs import plan


def _load_config(spec: str):
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("job_config_file", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/vmc.py:car_forest")
    parser.add_argument("--target", default="v5e:2x2")
    parser.add_argument("--stages", default=",".join(plan.PLAN_STAGES))
    parser.add_argument("--all_variants", action="store_true", help="train step in bf16 / fp32, remat on / off")
    parser.add_argument("--out", default=None, help="JSON file (default: stdout only)")
    args = parser.parse_args()
    config = _load_config(args.config)
    target = plan.parse_target(args.target)
    variants = [(d, r) for d in ("bfloat16", "float32") for r in (True, False)] if args.all_variants else None
    plans = plan.plan_job(config, target, tuple(args.stages.split(",")), variants,
                          report=lambda p: print(f"{p.name:30} compile {p.compile_s:7.1f} s", flush=True))
    record = {"config": args.config, "target": args.target, "jax": jax.__version__, "host": platform.node(),
              "python": sys.version.split()[0], "programs": [p.as_json() for p in plans]}
    if args.out:
        files.write_text_atomic(args.out, json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
