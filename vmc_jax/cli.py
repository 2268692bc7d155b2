"""The ``vmc-jax`` command.

    vmc-jax download DST [--stages keyframes,interpolation,sr1,sr2] [--overwrite]   the released weights of
                                                  each stage from the Hugging Face Hub, converted
    vmc-jax convert SRC DST [--overwrite]         hub pipeline or model folder -> Flax checkpoints
    vmc-jax tiny-pipeline DST [STAGES_DST] [--overwrite]  write a small random Show-1 pipeline (hub format),
                                                  and tiny pipelines of the later cascade stages
    vmc-jax train --config configs/vmc.py[:clip] --workdir W [--config.<field>=<value> ...] [--strict]
    vmc-jax generate --workdir W --prompt "..." [--prompt "..."] [--allow_untuned]   keyframes, tuned weights
        [--stages keyframes,interpolation,sr1,sr2]      and the later cascade stages
        [--init inverted|random]                   from the clip's inverted noise (default) or random noise
    vmc-jax export --workdir W --out FILE.safetensors [--overwrite]               the tuned delta, PyTorch names
    vmc-jax world-pipeline DST [--overwrite]      write the pretrained moving-shapes world pipeline (hub format)
    vmc-jax world-pretrain --config configs/world.py[:cpu] --workdir W   pretrain the world model (resumable)
    vmc-jax evaluate --workdir W [--overwrite]    motion and appearance of W's newest `generate` samples
                                                  (moving-shapes world clips and prompts)
    vmc-jax plan --config configs/vmc.py[:clip] --target=v5e:2x2 [--json=F] [--stages=train,keyframes,cascade]
        [--all_variants]                          compile the job's programs for a TPU slice / GPUs / CPUs:
                                                  memory per chip, FLOPs, roofline time (refuses what does not fit)
    vmc-jax train ... --coordinator=HOST:PORT --num_processes=N --process_id=I   one of N processes
        [--join_timeout=300] [--heartbeat_timeout=30]   seconds; then the job stops with one line (exit 1)
    vmc-jax train ... --multihost                 on a TPU VM slice, where JAX finds the other hosts

A user error prints one line ``vmc-jax: error: ...`` (its detail, if any, on a second) and exits
with 2 (``--verbose`` adds the traceback); a run that diverges exits with 1. No command replaces an
existing output unless ``--overwrite``; a refused command writes nothing. SIGTERM or SIGINT stops
`train` after its current step with a checkpoint, prints one line (where it stopped, the command that
resumes) and exits with 3; a second signal ends it at once (a shell reports 130 for SIGINT, 143 for
SIGTERM). Ctrl-C in another command prints one line and exits with 130.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import signal
import sys
import traceback
import warnings

from absl import app, flags, logging as absl_logging
from ml_collections import ConfigDict, config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file, optionally with :arg.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The job's folder: config, checkpoints, metrics, samples.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt to generate (repeatable).")
_OUT = flags.DEFINE_string("out", None, "The file `export` writes (*.safetensors).")
_STAGES = flags.DEFINE_list("stages", None, "`generate`, `download`: cascade stages, e.g. keyframes,interpolation,"
                            "sr1,sr2 (default: keyframes and every stage config.cascade gives a folder for; "
                            "`download`: all).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "`convert`, `tiny-pipeline`, `world-pipeline`, `export`, "
                                "`evaluate`: replace an existing output.")
_STRICT = flags.DEFINE_bool("strict", False, "Refuse an unreadable latest checkpoint instead of using the previous.")
_ALLOW_UNTUNED = flags.DEFINE_bool("allow_untuned", False, "`generate`: sample with the pretrained weights "
                                   "when the workdir has no checkpoint.")
_INIT = flags.DEFINE_enum("init", None, ["inverted", "random"], "`generate`: start from the clip's inverted "
                          "noise or from random noise (default: config.sampling.init, inverted).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Print the traceback of an error, and all library logs.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "Multi-process job: HOST:PORT of process 0's coordinator.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process job: how many processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process job: this process's index.")
_TARGET = flags.DEFINE_string("target", None, "`plan`: v5e:2x2, v4:2x2x1, v5p:2x2x1 (TPU topologies), cpu:N, gpu:N.")
_JSON = flags.DEFINE_string("json", None, "`plan`: also write the table as JSON to this file.")
_ALL_VARIANTS = flags.DEFINE_bool("all_variants", False, "`plan`: the train step in bf16 and fp32, remat on and off.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Join the multi-process job JAX discovers (TPU VM slices).")
_JOIN_TIMEOUT = flags.DEFINE_float("join_timeout", 300, "Multi-process job: seconds for all processes to join.")
_HEARTBEAT_TIMEOUT = flags.DEFINE_float("heartbeat_timeout", 30, "Multi-process job: seconds of silence after "
                                        "which a peer counts as gone and the job stops.")

_JOB_FLAGS = ("config", "workdir")
_MULTI_PROCESS_FLAGS = ("coordinator", "num_processes", "process_id", "multihost", "join_timeout", "heartbeat_timeout")
# command -> (what it does, its usage, the flags it reads, whether it reads a job config's fields)
COMMANDS = {
    "download": ("fetch the released weights of each cascade stage from the Hugging Face Hub and convert them",
                 "vmc-jax download DST [--stages keyframes,interpolation,sr1,sr2] [--overwrite]",
                 ("stages", "overwrite"), False),
    "convert": ("convert a hub pipeline or model folder (PyTorch weights) to Flax checkpoints",
                "vmc-jax convert SRC DST [--overwrite]", ("overwrite",), False),
    "tiny-pipeline": ("write a small random Show-1 pipeline (hub layout), and tiny pipelines of the later stages",
                      "vmc-jax tiny-pipeline DST [STAGES_DST] [--overwrite]", ("overwrite",), False),
    "world-pipeline": ("write the pretrained moving-shapes world pipeline (hub layout)",
                       "vmc-jax world-pipeline DST [--overwrite]", ("overwrite",), False),
    "train": ("tune the keyframe UNet's temporal attention on a clip (resumable; several clips, hosts)",
              "vmc-jax train --config configs/vmc.py[:clip] --workdir W [--config.<field>=<value> ...]",
              (*_JOB_FLAGS, "strict", *_MULTI_PROCESS_FLAGS), True),
    "generate": ("sample keyframe videos for prompts with the tuned weights, then the later cascade stages",
                 "vmc-jax generate --workdir W --prompt \"...\" [--prompt \"...\"]",
                 (*_JOB_FLAGS, "prompt", "stages", "init", "allow_untuned", "strict"), True),
    "export": ("write the tuned weights (the delta) in PyTorch names as safetensors",
               "vmc-jax export --workdir W --out FILE.safetensors", (*_JOB_FLAGS, "out", "overwrite", "strict"), True),
    "evaluate": ("measure motion and appearance of the newest generated samples of a moving-shapes world job",
                 "vmc-jax evaluate --workdir W", (*_JOB_FLAGS, "overwrite"), True),
    "world-pretrain": ("pretrain the moving-shapes world model from a seed (resumable, in time-budget pieces)",
                       "vmc-jax world-pretrain --config configs/world.py[:cpu] --workdir W "
                       "[--config.train.time_budget_s=S]", ("config", "workdir"), False),
    "plan": ("compile the job's programs for a TPU slice, GPUs or CPUs: memory per chip, FLOPs, roofline time",
             "vmc-jax plan --config configs/vmc.py[:clip] --target=v5e:2x2",
             ("config", "target", "json", "stages", "all_variants"), True),
}
_joined_job = False  # whether this process is one of a multi-process job
USER_ERROR, RUN_FAILED = 2, 1
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def _error_text(error: BaseException) -> str:
    """An error's whole message in at most two lines: its first line, then the rest joined on a second."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[0] + ("\n  " + "; ".join(lines[1:]) if len(lines) > 1 else "")


def _fail(message: str, code: int = USER_ERROR) -> None:
    print(f"vmc-jax: error: {message}", file=sys.stderr)
    if _joined_job:
        # One process of a multi-process job: leave now rather than wait at JAX's shutdown barrier
        # for peers that wait on this one; they stop when they miss it.
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _quiet_logs() -> None:
    """No backend probing, PyTorch-missing or fork notices on a plain CPU run (``--verbose`` keeps them)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
    # orbax logs through absl: every file it writes, and each storage error several times (reported here once)
    for name, level in (("jax", logging.WARNING), ("absl", logging.CRITICAL), ("asyncio", logging.CRITICAL)):
        logging.getLogger(name).setLevel(level)


def _job_config() -> ConfigDict:
    """--config if given, else the config the workdir's training run saved."""
    from vmc_jax.jobs import workdir

    return _CONFIG.value if _CONFIG.value is not None else workdir.load_config(_require(_WORKDIR, "workdir"))


def _require(flag, name: str):
    if not flag.value:
        raise app.UsageError(f"--{name} is required")
    return flag.value


def _unknown_config_override(argv: list[str]) -> str | None:
    """The first ``--config.<field>=`` naming no config field, with the closest field, for a one-line error."""
    from vmc_jax.jobs.config import FIELDS, did_you_mean, field_check

    for arg in argv:
        if arg.startswith("--config."):
            field = arg[len("--config."):].split("=", 1)[0]
            if field_check(field) is None:
                return f"--config.{field}: unknown config field{did_you_mean(field, list(FIELDS))}"
    return None


def _config_argument(argv: list[str]) -> str | None:
    """The value of ``--config`` (``--config X`` or ``--config=X``) in ``argv``, if given."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg[len("--config="):]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _config_file_error(spec: str) -> str | None:
    """Why the config ``FILE[:arg]`` cannot be loaded (its message, and line), or None if it can.

    ml_collections reports a config file's failure as a traceback or as "an earlier failure to
    load" without the reason; after such a failure the file is run again here to say why.
    """
    path, has_arg, arg = spec.partition(":")
    try:
        module_spec = importlib.util.spec_from_file_location("vmc_jax_cli_config_check", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        if not callable(getattr(module, "get_config", None)):
            return "the file defines no get_config()"
        module.get_config(*([arg] if has_arg else []))
    except SyntaxError as e:
        return f"line {e.lineno}: {e.msg}"
    except ValueError as e:  # the config's own refusal, worded for its user
        return _error_text(e)
    except Exception as e:  # noqa: BLE001 -- any other failure of the user's config file, with its line
        lines = [frame.lineno for frame in traceback.extract_tb(e.__traceback__)
                 if os.path.abspath(frame.filename) == os.path.abspath(path)]
        return (f"line {lines[-1]}: " if lines else "") + f"{type(e).__name__}: {_error_text(e)}"
    return None


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a flag or config file error reported in one line (exit 2)."""
    spec = _config_argument(argv)
    if spec is not None and not os.path.isfile(spec.partition(":")[0]):
        _fail(f"--config {spec}: no such file")  # ml_collections would only fail when the config is read
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 -- ml_collections lets a config file's own exception through
        problem = _config_file_error(spec) if spec is not None else None
        if problem is not None:
            _fail(f"--config {spec}: {problem}")
        if not isinstance(e, (flags.Error, AttributeError, KeyError, ValueError)):
            raise
        job_command = len(argv) > 1 and argv[1] in COMMANDS and COMMANDS[argv[1]][3]
        _fail((_unknown_config_override(argv) if job_command else None) or str(e).strip().splitlines()[0])


def overview() -> str:
    """``vmc-jax --help``: every command with one line."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:{width}}  {summary}" for name, (summary, *_) in COMMANDS.items()]
    return ("usage: vmc-jax COMMAND [flags]\n\ncommands:\n" + "\n".join(lines)
            + "\n\n`vmc-jax COMMAND --help` shows a command's flags (and the config fields it reads).")


def command_help(command: str) -> str:
    """``vmc-jax COMMAND --help``: its usage, its flags with their defaults, and the job config's fields."""
    summary, usage, names, reads_config = COMMANDS[command]
    lines = [f"usage: {usage}", "", summary, "", "flags:"]
    for name in (*names, "verbose"):
        flag = flags.FLAGS[name]
        default = "" if flag.default in (None, [], False) else f" (default: {flag.default})"
        lines.append(f"  --{name:18} {flag.help.splitlines()[0].rstrip(';')}{default}")
    if reads_config:
        from vmc_jax.jobs import config as jobs_config

        lines += ["", "config fields (--config.<field>=<value>), by section, with their defaults:"]
        defaults = jobs_config.defaults()
        top = [f for f in jobs_config.FIELDS if "." not in f]
        lines += [f"  {f} = {defaults[f]!r}" for f in top]
        for section, kind in jobs_config.SECTIONS.items():
            lines += ["", f"  {section}: {kind.__doc__.splitlines()[0]}"]
            lines += [f"    {section}.{f.name} = {defaults[section][f.name]!r}" for f in dataclasses.fields(kind)]
    return "\n".join(lines)


def _dispatch(command: str, args: list[str]) -> None:
    if command == "download":
        if len(args) != 1:
            raise app.UsageError("usage: vmc-jax download DST [--stages keyframes,interpolation,sr1,sr2] [--overwrite]")
        from vmc_jax.jobs.download import STAGE_REPOSITORIES, download

        folders = download(args[0], _STAGES.value or list(STAGE_REPOSITORIES), overwrite=_OVERWRITE.value)
        print("converted; a job reads them with:")
        for field, folder in folders.items():
            print(f"  --config.{field}={folder}")
    elif command == "convert":
        if len(args) != 2:
            raise app.UsageError("usage: vmc-jax convert SRC DST [--overwrite]")
        from vmc_jax.jobs.convert import convert

        convert(*args, overwrite=_OVERWRITE.value)
    elif command == "tiny-pipeline":
        if len(args) not in (1, 2):
            raise app.UsageError("usage: vmc-jax tiny-pipeline DST [STAGES_DST] [--overwrite]")
        from vmc_jax import files
        from vmc_jax.hub.tiny_pipeline import make_tiny_cascade, make_tiny_pipeline

        for folder in args:  # both, before either is written
            files.refuse_existing(folder, _OVERWRITE.value)
        print(make_tiny_pipeline(args[0], overwrite=_OVERWRITE.value))
        for path in make_tiny_cascade(args[1], overwrite=_OVERWRITE.value).values() if len(args) == 2 else ():
            print(path)
    elif command == "world-pipeline":
        if len(args) != 1:
            raise app.UsageError("usage: vmc-jax world-pipeline DST [--overwrite]")
        from vmc_jax.jobs.world_pretraining import write_pretrained_pipeline

        print(write_pretrained_pipeline(args[0], overwrite=_OVERWRITE.value))
    elif command == "evaluate":
        from vmc_jax.jobs.evaluate import evaluate_workdir

        result, folder = evaluate_workdir(_job_config(), _require(_WORKDIR, "workdir"), overwrite=_OVERWRITE.value)
        from vmc_jax.world_evaluation import summary_lines

        print("\n".join(summary_lines(result["summary"])))
        print(f"per clip, with side-by-side gifs: {folder}")
    elif command == "world-pretrain":
        from vmc_jax.jobs.world_pretraining import pretrain

        if _CONFIG.value is None:
            raise app.UsageError("--config is required")
        print(pretrain(_CONFIG.value, _require(_WORKDIR, "workdir")))
    elif command == "plan":
        from vmc_jax.jobs.plan import plan_command, request_cpu_devices

        request_cpu_devices(_require(_TARGET, "target"))
        if _CONFIG.value is None:
            raise app.UsageError("--config is required")
        plan_command(_CONFIG.value, _require(_TARGET, "target"), _JSON.value, _STAGES.value, _ALL_VARIANTS.value)
    elif command == "train":
        from vmc_jax.jobs.tune import train_and_evaluate

        if _CONFIG.value is None:
            raise app.UsageError("--config is required")
        train_and_evaluate(_CONFIG.value, _require(_WORKDIR, "workdir"), strict=_STRICT.value)
    elif command == "generate":
        from vmc_jax.jobs.generate import generate_prompts

        config = _job_config()
        if _INIT.value:
            with config.unlocked():
                config.sampling.init = _INIT.value
        for path in generate_prompts(config, _require(_WORKDIR, "workdir"), _PROMPT.value, _STAGES.value,
                                     allow_untuned=_ALLOW_UNTUNED.value, strict=_STRICT.value):
            print(path)
    else:
        from vmc_jax.jobs.export import export_tuned

        job_dir, out = _require(_WORKDIR, "workdir"), _require(_OUT, "out")
        print(export_tuned(_job_config(), job_dir, out, overwrite=_OVERWRITE.value, strict=_STRICT.value))


def main(argv: list[str]) -> None:
    from vmc_jax.errors import JobError, TrainingDiverged, TrainingStopped

    if not _VERBOSE.value:
        _quiet_logs()
    logging.getLogger().setLevel(logging.INFO)
    # "12:02:48 INFO step 50/200 ..." rather than absl's "I1202 12:02:48.173926 140197944101760 train.py:111]"
    absl_logging.get_absl_handler().setFormatter(logging.Formatter(LOG_FORMAT, "%H:%M:%S"))
    try:
        if argv[1] == "train":
            from vmc_jax import parallel

            global _joined_job
            _joined_job = parallel.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                              auto=_MULTIHOST.value, join_timeout_s=_JOIN_TIMEOUT.value,
                                              heartbeat_timeout_s=_HEARTBEAT_TIMEOUT.value)
        _dispatch(argv[1], argv[2:])
    except TrainingStopped as e:
        from vmc_jax.jobs import preemption

        preemption.exit_stopped(e, "vmc-jax", ["vmc-jax"], at_once=_joined_job)
    except (app.UsageError, JobError, OSError, ValueError, TrainingDiverged) as e:
        if _VERBOSE.value:
            traceback.print_exc()
        _fail(_error_text(e), RUN_FAILED if isinstance(e, TrainingDiverged) else USER_ERROR)


def _help_or_unknown_command(argv: list[str]) -> None:
    """Answers ``vmc-jax``, ``--help`` / ``-h`` and ``COMMAND --help`` itself (absl's help knows no
    commands), and an unknown command with the closest one; returns for anything else."""
    from vmc_jax.jobs.config import did_you_mean

    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(overview())
        sys.exit(0 if len(argv) > 1 else USER_ERROR)
    if argv[1] not in COMMANDS:
        known = ", ".join(COMMANDS)
        _fail(f"unknown command {argv[1]!r}{did_you_mean(argv[1], list(COMMANDS))} (commands: {known})")
    if {"-h", "--help"} & set(argv[2:]):
        print(command_help(argv[1]))
        sys.exit(0)


def run() -> None:
    """Console entry point."""
    _help_or_unknown_command(sys.argv)
    if "--verbose" not in sys.argv:
        _quiet_logs()  # before JAX, transformers and orbax are imported
    try:
        app.run(main, argv=sys.argv, flags_parser=_parse_flags)
    except KeyboardInterrupt:  # Ctrl-C before `train` handles it, or in another command: one line
        _fail("interrupted", 128 + signal.SIGINT)


if __name__ == "__main__":
    run()
