"""`vmc-jax plan` on the tiny pipeline: its abstract compile equals the job's real one, refusals, targets."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import REPO, tiny_config

from vmc_jax import parallel, training
from vmc_jax.hub import tiny_pipeline
from vmc_jax.hub.unet_loading import load_unet
from vmc_jax.jobs import plan
from vmc_jax.schedulers import from_config


@pytest.fixture(scope="module")
def tiny_hub(tmp_path_factory) -> str:
    """The tiny pipeline in hub format: all `plan` reads of it is the UNet's config.json."""
    return tiny_pipeline.make_tiny_pipeline(str(tmp_path_factory.mktemp("plan") / "hub"))


@pytest.fixture(scope="module")
def train_plan(tiny_hub, fast_compile):
    """(config, target, the plan of the train step on cpu:4)."""
    config = tiny_config(tiny_hub)
    target = plan.parse_target("cpu:4")
    mesh = parallel.make_mesh(config.mesh, devices=target.devices)
    step = plan.train_programs(config, mesh)[0]
    return config, target, plan.measure(step, target)


def test_plan_equals_the_memory_analysis_of_the_jobs_compiled_step_on_concrete_inputs(train_plan, tiny_hub):
    config, target, planned = train_plan
    c = config
    # the train step as jobs/tune.py builds and places it, on real (small) arrays
    model, params = load_unet(f"{tiny_hub}/unet", dtype=np.float32)
    model = model.clone(remat=c.train.remat)
    mesh = parallel.make_mesh(c.mesh, devices=target.devices)
    tuned, frozen = training.split_params(params, c.train.tuned_params)
    optimizer = training.make_optimizer(training.lr_schedule(c.train.lr, c.train.lr_schedule, c.train.steps))
    state = parallel.put_global(mesh, training.TrainState.create(tuned, optimizer, jax.random.PRNGKey(0)))
    batch = parallel.padded_size(c.train.batch_size, mesh.shape["data"])
    clips = parallel.put_global(mesh, np.zeros((batch, c.data.num_frames, c.data.height, c.data.width, 3),
                                               np.float32), "data")
    text = parallel.put_global(mesh, np.zeros((1, 77, model.config.encoder_hid_dim), np.float32))
    weights = parallel.put_global(mesh, (np.arange(batch) < c.train.batch_size).astype(np.float32), "data")
    step = training.make_train_step(model, from_config(tiny_pipeline.SCHEDULER_CONFIG), optimizer, c.train.loss)
    memory = step.lower(state, parallel.put_global(mesh, frozen), clips, text, weights).compile().memory_analysis()
    assert batch == 4 and planned.name == "train_step[float32,remat=off]"
    assert (planned.argument_bytes, planned.temp_bytes, planned.output_bytes, planned.alias_bytes) == (
        memory.argument_size_in_bytes, memory.temp_size_in_bytes, memory.output_size_in_bytes,
        memory.alias_size_in_bytes)
    assert planned.fits and planned.flops > 0 and planned.estimated_s is None  # no roofline for a CPU


def test_a_plan_that_does_not_fit_is_refused_with_its_sizes_and_a_fix(train_plan):
    config, target, planned = train_plan
    small = plan.Target("v5e:2x2", "tpu", target.devices, plan.CHIPS["v5e"], planned.bytes_per_chip - 1, 1.0)
    over = plan.ProgramPlan(**{**planned.as_json(), "hbm_bytes": small.hbm_per_device, "fits": False})
    message = plan.refusal([over], small, config)
    assert message.startswith("train_step[float32,remat=off] needs ")
    assert f"{planned.bytes_per_chip / plan.GiB:.2f} GiB per device" in message
    assert "--config.train.remat=True" in message and "--config.train.compute_dtype=bfloat16" in message
    assert plan.refusal([planned], target, config) is None


@pytest.mark.parametrize("spec,expected", [("v9:2x2", "expected v5e:TOPOLOGY"), ("cpu:64", "has 4 cpu devices"),
                                           ("v5e:2xA", "KIND:TOPOLOGY")])
def test_bad_targets_are_refused_naming_the_target(spec, expected):
    with pytest.raises(ValueError, match=expected):
        plan.parse_target(spec)


def test_cli_refuses_a_bad_target_in_one_line(tiny_hub):
    result = subprocess.run([sys.executable, "-m", "vmc_jax.cli", "plan", "--config", "configs/vmc.py:tiny",
                             f"--config.pretrained={tiny_hub}", "--target=v9:1"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["vmc-jax: error: --target=v9:1: expected v5e:TOPOLOGY, "
                                                  "v4:TOPOLOGY, v5p:TOPOLOGY, cpu:N or gpu:N"]


def test_tpu_topology_compiles_the_tiny_train_step(tiny_hub, fast_compile):
    pytest.importorskip("libtpu", reason="TPU targets need libtpu (pip install -e '.[tpu]')")
    config = tiny_config(tiny_hub)
    target = plan.parse_target("v5e:2x2")
    mesh = parallel.make_mesh(config.mesh, devices=target.devices)
    planned = plan.measure(plan.train_programs(config, mesh)[0], target)
    assert planned.fits and planned.flops > 0 and planned.estimated_s > 0
    assert json.loads(json.dumps(planned.as_json()))["hbm_bytes"] == 16 * plan.GiB


def test_attention_auto_resolves_for_the_backend_being_planned(monkeypatch):
    from vmc_jax.kernels import attention_core

    seen = []
    resolve = attention_core.resolve_implementation
    monkeypatch.setattr(attention_core, "resolve_implementation",
                        lambda *a, **kw: seen.append((kw["backend"], kw["devices"])) or resolve(*a, **kw))
    q = jax.numpy.zeros((1, 8, 2, 4))
    with attention_core.tracing_for("tpu", 4):
        jax.eval_shape(lambda: attention_core.dot_product_attention(q, q, q, scale=0.5, implementation="xla"))
    attention_core.dot_product_attention(q, q, q, scale=0.5, implementation="xla")
    assert seen == [("tpu", 4), (jax.default_backend(), jax.device_count())]


def test_the_keyframe_programs_use_the_jobs_attention(tiny_hub):
    config = tiny_config(tiny_hub)
    config.attention = "blocked"
    mesh = parallel.make_mesh(config.mesh, devices=jax.devices()[:1])
    assert {program.args[0].attention_impl for program in plan.keyframe_programs(config, mesh)} == {"blocked"}
