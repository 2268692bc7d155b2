"""Regenerates golden test data ("fixtures") from the PyTorch reference Show-1 video UNet.

This is a developer tool, not part of the library: it needs the Show-1 source tree (the public
showlab/Show-1 repository, given by ``--show1-src``) and an environment where that code runs,
i.e. PyTorch with diffusers 0.19.3 (the version Show-1 was written against; it also needs a
``huggingface_hub`` older than 0.26). The project's own venv has a newer diffusers, so run this
with a separate reference venv, e.g.::

    python3 -m venv /work/refenv
    /work/refenv/bin/pip install torch diffusers==0.19.3 "huggingface_hub<0.26" "numpy<2" safetensors
    /work/refenv/bin/python weights_conversion/make_show1_fixtures.py \
        --show1-src /path/to/Show-1 --preset crossattn --out tests/fixtures/show1_crossattn

No reference code is copied here: the script only imports ``showone.models.unet_3d_condition``
from ``--show1-src``, builds a ``UNet3DConditionModel`` from a small config, and records what
it computes.

What it writes (the layout of the Show-1 fixtures in tests/fixtures/show1_*)::

    OUT/unet/config.json
    OUT/unet/diffusion_pytorch_model.fp16.safetensors    every parameter random, stored in fp16
    OUT/io.npz                                           inputs, outputs, gradients (channels first)

Every parameter is drawn at random, including those a fresh model sets to zero (the last conv
of each TemporalConvLayer), so that a mapping mistake anywhere changes the output. The weights
are rounded to fp16 and saved; the reference then runs in fp32 (eval mode: no dropout) on
exactly those fp16 values, so "load the fp16 file, upcast to fp32" must reproduce ``out``.

``io.npz`` keys: ``sample`` (b, c_in, f, h, w), ``timesteps`` (b,), ``encoder_hidden_states``
(b, seq, encoder_hid_dim or cross_attention_dim), ``class_labels`` (b,) when the config has a
class embedding (noise levels for "timestep", class ids for ``num_class_embeds``), ``out`` (b, c_out, f, h, w), ``grad_proj`` (like out, random), ``grad_loss``
(= sum(out * grad_proj)), and ``grad/<torch name>`` = d grad_loss / d parameter for every
``to_q`` / ``to_k`` / ``to_v`` weight (and bias, if any) under ``temp_attentions`` (the
parameters that VMC fine-tunes).

``--preset`` picks a built-in config (see PRESETS); ``--override KEY=JSON`` changes single
config entries (e.g. ``--override use_linear_projection=true``), which is how one-off parity
checks of other settings are made without committing their data.

``--keyframe-sampling`` records the released keyframe generation path instead: the VMC release's
``TextToVideoIFPipeline`` (give the VMC checkout as ``--show1-src``; its pipeline takes the inverted
noise as ``inv_images``) runs on the existing fixture UNet in ``OUT/unet`` with an IF-style DDPM
scheduler (learned-range variance, dynamic thresholding active), classifier-free guidance and
text states given directly, and every per-step variance noise it draws is recorded. It writes
``OUT/keyframe_sampling.npz``: ``x_T`` (b, c, f, h, w), ``prompt_embeds`` / ``negative_prompt_embeds``
(b, seq, d), ``noise`` (steps, b * f, c, h, w, in the order the pipeline drew it), ``video``
(b, c, f, h, w, the pipeline's last intermediate images), ``steps``, ``guidance`` and
``scheduler_config`` (JSON text)::

    /work/refenv/bin/python weights_conversion/make_show1_fixtures.py --keyframe-sampling \
        --show1-src /path/to/Video-Motion-Customization --out tests/fixtures/show1_keyframes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

import numpy as np

# Small configs that use Show-1's block types. Keys not given take UNet3DConditionModel's defaults.
PRESETS = {
    # Transformer2DModel ("CrossAttn") and plain resnet blocks, as in diffusers' text-to-video UNets,
    # with a per-block attention_head_dim list (for these blocks it is the head COUNT: 2, 4, 8, so
    # that a down/up or mid index mix-up changes the head size), "default" time-embedding resnets,
    # silu, 16 norm groups (two channels per group), and no encoder_hid_proj / addition embedding
    # (the text states go to the cross-attentions as they are; the show1_* fixtures cover
    # text_proj and the "text" addition embedding). 32 channels everywhere keeps the whole
    # fixture under 2 MB (one 64-channel level alone would double the weights).
    "crossattn": dict(
        sample_size=16,
        in_channels=3,
        out_channels=6,
        down_block_types=["CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"],
        mid_block_type="UNetMidBlock3DCrossAttn",
        up_block_types=["UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"],
        block_out_channels=[32, 32, 32],
        layers_per_block=1,
        attention_head_dim=[2, 4, 8],
        cross_attention_dim=32,
        encoder_hid_dim=None,
        encoder_hid_dim_type=None,
        addition_embed_type=None,
        act_fn="silu",
        norm_num_groups=16,
        norm_eps=1e-5,
        resnet_time_scale_shift="default",
        transformer_layers_per_block=1,
        use_linear_projection=False,
    ),
}

DEFAULT_SHAPE = dict(batch=2, frames=3, height=16, width=24, seq=7)

TUNED = re.compile(r"temp_attentions\..*\.to_[qkv]\.(weight|bias)$")


def import_show1(src: str):
    """Imports Show-1's UNet3DConditionModel from the source tree at ``src``."""
    if not os.path.isdir(os.path.join(src, "showone", "models")):
        raise SystemExit(f"--show1-src {src!r}: no showone/models folder there (expected a Show-1 checkout)")
    sys.path.insert(0, os.path.abspath(src))
    import diffusers  # noqa: F401  (fail early with the real import error)
    import safetensors.torch  # noqa: F401  (diffusers 0.19.3 uses it as an attribute of safetensors)
    from showone.models.unet_3d_condition import UNet3DConditionModel

    return UNet3DConditionModel


def randomise_(model, seed: int) -> None:
    """Overwrites every parameter with random values of a sensible scale.

    Matrices and kernels: N(0, 1/fan_in); norm scales: 1 + N(0, 0.2^2); other vectors (biases,
    norm shifts): N(0, 0.1^2). Nothing is left at its (possibly zero) initial value.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = p[0].numel()
                value = torch.randn(p.shape, generator=generator) / math.sqrt(fan_in)
            elif name.endswith("weight"):
                value = 1 + 0.2 * torch.randn(p.shape, generator=generator)
            else:
                value = 0.1 * torch.randn(p.shape, generator=generator)
            p.copy_(value)


def make_inputs(config: dict, shape: dict, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    b, f, h, w = shape["batch"], shape["frames"], shape["height"], shape["width"]
    text_dim = config.get("encoder_hid_dim") or config.get("cross_attention_dim")
    if isinstance(text_dim, (list, tuple)):
        text_dim = text_dim[0]
    io = {
        "sample": rng.standard_normal((b, config["in_channels"], f, h, w)).astype(np.float32),
        "timesteps": rng.integers(0, 1000, size=(b,)).astype(np.int64),
        "encoder_hidden_states": rng.standard_normal((b, shape["seq"], text_dim)).astype(np.float32),
    }
    if config.get("class_embed_type") == "timestep":
        io["class_labels"] = rng.integers(0, 1000, size=(b,)).astype(np.int64)
    elif config.get("class_embed_type") is None and config.get("num_class_embeds"):
        io["class_labels"] = rng.integers(0, config["num_class_embeds"], size=(b,)).astype(np.int64)
    return io


def run_reference(model, io: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Output, grad_proj, grad_loss and the tuned gradients of the fp32 model in eval mode."""
    import torch

    model.eval()
    model.zero_grad(set_to_none=True)
    kwargs = {}
    if "class_labels" in io:
        kwargs["class_labels"] = torch.from_numpy(io["class_labels"])
    out = model(torch.from_numpy(io["sample"]), torch.from_numpy(io["timesteps"]),
                torch.from_numpy(io["encoder_hidden_states"]), return_dict=False, **kwargs)[0]
    rng = np.random.default_rng(seed + 1)
    grad_proj = rng.standard_normal(tuple(out.shape)).astype(np.float32)
    loss = (out * torch.from_numpy(grad_proj)).sum()
    loss.backward()
    result = {
        "out": out.detach().numpy().astype(np.float32),
        "grad_proj": grad_proj,
        "grad_loss": np.asarray(loss.item(), dtype=np.float64),
    }
    names = [n for n, _ in model.named_parameters() if TUNED.search(n)]
    if not names:
        raise SystemExit("the model has no temporal-attention q/k/v parameters; nothing to differentiate")
    params = dict(model.named_parameters())
    for name in names:
        result[f"grad/{name}"] = params[name].grad.detach().numpy().astype(np.float32)
    return result


# The IF-I / Show-1 base scheduler settings that matter for sampling: learned-range variance and
# Imagen's dynamic thresholding (quantile 0.95, at most 1.5).
KEYFRAME_SCHEDULER = dict(_class_name="DDPMScheduler", beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000,
                          variance_type="learned_range", prediction_type="epsilon", clip_sample=True,
                          clip_sample_range=1.0, thresholding=True, dynamic_thresholding_ratio=0.95,
                          sample_max_value=1.5)
KEYFRAME_SAMPLING = dict(frames=4, height=16, width=24, seq=7, steps=6, guidance=1.5)


def record_keyframe_sampling(src: str, out: str, seed: int) -> None:
    """Runs the released keyframe pipeline on ``OUT/unet`` and writes ``OUT/keyframe_sampling.npz``."""
    import torch

    UNet3DConditionModel = import_show1(src)
    import diffusers.schedulers.scheduling_ddpm as ddpm
    from showone.pipelines.pipeline_t2v_base_pixel import TextToVideoIFPipeline

    unet = UNet3DConditionModel.from_pretrained(os.path.join(out, "unet"), variant="fp16").float().eval()
    scheduler = ddpm.DDPMScheduler.from_config(KEYFRAME_SCHEDULER)
    pipe = TextToVideoIFPipeline(tokenizer=None, text_encoder=None, unet=unet, scheduler=scheduler,
                                 feature_extractor=None)
    shape = KEYFRAME_SAMPLING
    rng = np.random.default_rng(seed)
    text_dim = unet.config.encoder_hid_dim or unet.config.cross_attention_dim
    io = {
        "x_T": rng.standard_normal((1, unet.config.in_channels, shape["frames"], shape["height"],
                                    shape["width"])).astype(np.float32),
        "prompt_embeds": rng.standard_normal((1, shape["seq"], text_dim)).astype(np.float32),
        "negative_prompt_embeds": rng.standard_normal((1, shape["seq"], text_dim)).astype(np.float32),
    }
    drawn = []
    draw = ddpm.randn_tensor

    def recording_draw(*args, **kwargs):
        noise = draw(*args, **kwargs)
        drawn.append(noise.numpy().copy())
        return noise

    ddpm.randn_tensor = recording_draw
    video = pipe(inv_images=torch.from_numpy(io["x_T"]), prompt_embeds=torch.from_numpy(io["prompt_embeds"]),
                 negative_prompt_embeds=torch.from_numpy(io["negative_prompt_embeds"]),
                 num_inference_steps=shape["steps"], guidance_scale=shape["guidance"],
                 num_frames=shape["frames"], height=shape["height"], width=shape["width"],
                 generator=torch.Generator().manual_seed(seed), output_type="pt").frames
    # The last step (t = 0) draws no noise; keep the sampler's one-draw-per-step layout with zeros.
    drawn += [np.zeros_like(drawn[0])] * (shape["steps"] - len(drawn))
    io.update(noise=np.stack(drawn).astype(np.float32), video=video.numpy().astype(np.float32),
              steps=np.int64(shape["steps"]), guidance=np.float64(shape["guidance"]),
              scheduler_config=np.array(json.dumps(KEYFRAME_SCHEDULER)))
    np.savez_compressed(os.path.join(out, "keyframe_sampling.npz"), **io)
    print(f"wrote {out}/keyframe_sampling.npz: video {io['video'].shape}, {len(drawn)} noise draws")


def parse_override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--override {text!r}: expected KEY=JSON_VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--override {text!r}: value is not JSON ({e})") from e


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--show1-src", required=True, help="path of a Show-1 checkout (holds showone/)")
    parser.add_argument("--out", required=True, help="fixture folder to write (unet/ and io.npz go inside)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="crossattn")
    parser.add_argument("--override", type=parse_override, action="append", default=[],
                        help="KEY=JSON config override, repeatable")
    for key, value in DEFAULT_SHAPE.items():
        parser.add_argument(f"--{key}", type=int, default=value)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keyframe-sampling", action="store_true",
                        help="record the released keyframe pipeline on OUT/unet instead (see the docstring)")
    args = parser.parse_args(argv)
    if args.keyframe_sampling:
        record_keyframe_sampling(args.show1_src, args.out, args.seed)
        return

    UNet3DConditionModel = import_show1(args.show1_src)
    import torch

    torch.manual_seed(args.seed)
    config = dict(PRESETS[args.preset])
    config.update(dict(args.override))
    shape = {key: getattr(args, key) for key in DEFAULT_SHAPE}

    model = UNet3DConditionModel(**config)
    randomise_(model, args.seed)
    model.half()  # round every weight to fp16 (this is what gets saved) ...
    unet_dir = os.path.join(args.out, "unet")
    os.makedirs(unet_dir, exist_ok=True)
    model.save_pretrained(unet_dir, safe_serialization=True, variant="fp16")
    model.float()  # ... and the reference runs in fp32 on exactly those values

    io = make_inputs(config, shape, args.seed)
    io.update(run_reference(model, io, args.seed))
    np.savez_compressed(os.path.join(args.out, "io.npz"), **io)

    count = sum(p.numel() for p in model.parameters())
    grads = sum(1 for k in io if k.startswith("grad/"))
    print(f"wrote {args.out}: {count} parameters, out {io['out'].shape}, {grads} tuned gradients, "
          f"grad_loss {float(io['grad_loss']):.6g}")


if __name__ == "__main__":
    main()
