"""Regenerates the golden outputs of the cascade stages from the PyTorch reference pipelines.

A developer tool, not part of the library. It runs, in a reference environment (PyTorch with
diffusers 0.19.3, see make_show1_fixtures.py), on the tiny random stage pipelines that
``vmc_jax.hub.tiny_pipeline.make_tiny_cascade`` writes (made first with the project's own venv):

    Show-1's TextToVideoIFInterpPipeline       (--show1-src, imported at run time)
    diffusers' IFSuperResolutionPipeline        (the sr1 first frame, DeepFloyd IF-II)
    Show-1's TextToVideoIFSuperResolutionPipeline_Cond   (sr1 windows)
    diffusers' VideoToVideoSDPipeline           (sr2, with its CLIP text encoder and tokenizer)

Every random draw of the pipelines (``randn_tensor``) is replaced by arrays made here, which are
saved too, so the JAX stages can be fed the same noise. The loops around the pipeline calls are
those of Show-1's ``run_inference.py``: 7 interpolation windows re-seeded alike, sr1 windows of
8 frames with stride 7 each anchored on its first frame. No reference code is copied here.

    vmc-jax tiny-pipeline /tmp/base /tmp/cascade
    /work/refenv/bin/python weights_conversion/make_cascade_fixtures.py --show1-src /path/to/Show-1 \\
        --pipelines /tmp/cascade --out tests/fixtures/cascade

The reference runs in float64 (the weights and inputs are float32 values). Writes
``OUT/<stage>.npz`` (channels last, float32) with the stage's inputs, noise and output, and
``weights_sha256`` of the UNet weights it ran (a test re-making the tiny pipelines checks it).
The sampler settings are small (2 steps, guidance 2.0, see GUIDANCE) to keep float32 round-off
under the tests' 1e-4.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys

import numpy as np

PROMPT, NEGATIVE_PROMPT = "a red square is moving", "low resolution, blur"
TEXT_LENGTH = 8
STEPS = 2
# Guidance of the pixel stages and sr2. Lower than the release's (4, 4, 7, 15): guidance g scales
# float32 rounding of the model by 2g - 1 and the first step at t = 500 (2 steps) by 1 / sqrt(alpha_bar),
# so at g = 4 even the float32 reference is 1.7e-4 from its float64 run (measured), above the
# tests' 1e-4 tolerance. g = 2 keeps classifier-free guidance exercised with a small round-off.
GUIDANCE = 2.0


def video_to_torch(video: np.ndarray):
    """``(f, h, w, c)`` -> a torch ``(1, c, f, h, w)`` video."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(video.transpose(3, 0, 1, 2)[None])).double()


def images_to_torch(images: np.ndarray):
    """``(n, h, w, c)`` -> torch ``(n, c, h, w)``."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).double()


def video_from_torch(video) -> np.ndarray:
    """A torch ``(1, c, f, h, w)`` video -> ``(f, h, w, c)``."""
    return video[0].float().numpy().transpose(1, 2, 3, 0)


class InjectedNoise:
    """Stands in for diffusers' ``randn_tensor``: returns the queued arrays in order, checking shapes."""

    def __init__(self):
        self.queue = []

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        import torch

        if not self.queue:
            raise RuntimeError(f"unexpected random draw of shape {tuple(shape)}")
        value = self.queue.pop(0)
        if tuple(value.shape) != tuple(shape):
            raise RuntimeError(f"random draw of shape {tuple(shape)}, queued {tuple(value.shape)}")
        return torch.from_numpy(np.ascontiguousarray(value)).to(dtype or torch.float64)

    def install(self) -> None:
        """Replaces ``randn_tensor`` in every loaded diffusers / showone module that imported it."""
        import diffusers.utils

        original = diffusers.utils.randn_tensor
        for module in list(sys.modules.values()):
            if getattr(module, "randn_tensor", None) is original:
                module.randn_tensor = self


def step_draws(step_noise: np.ndarray, timesteps, frame_first) -> list[np.ndarray]:
    """The per-step draws DDPM makes (none at t = 0), in torch layout ``(frames, c, h, w)``."""
    return [frame_first(n) for n, t in zip(step_noise, timesteps) if int(t) > 0]


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def weights_file(folder: str) -> str:
    return os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--show1-src", required=True, help="path of a Show-1 checkout (holds showone/)")
    parser.add_argument("--pipelines", required=True, help="folder written by make_tiny_cascade")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.abspath(args.show1_src))
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, IFSuperResolutionPipeline, UNet2DConditionModel,
                           UNet3DConditionModel as ModelScopeUNet, VideoToVideoSDPipeline)
    from showone.models import UNet3DConditionModel
    from showone.pipelines import TextToVideoIFInterpPipeline
    from showone.pipelines.pipeline_t2v_sr_pixel_cond import TextToVideoIFSuperResolutionPipeline_Cond
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.set_grad_enabled(False)
    torch.set_default_dtype(torch.float64)  # the golden outputs are the reference's exact (float64) answer
    noise = InjectedNoise()
    noise.install()
    rng = np.random.default_rng(args.seed)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    os.makedirs(args.out, exist_ok=True)
    text, negative_text = normal(1, TEXT_LENGTH, 32), normal(1, TEXT_LENGTH, 32)
    embeds = dict(prompt_embeds=torch.from_numpy(text).double(),
                  negative_prompt_embeds=torch.from_numpy(negative_text).double())
    frame_first = lambda n: np.ascontiguousarray(np.moveaxis(n, -1, -3))  # noqa: E731  (f, h, w, c) -> (f, c, h, w)
    pipes = args.pipelines

    def schedulers_of(stage: str) -> dict:
        folder = os.path.join(pipes, stage)
        found = dict(scheduler=DDPMScheduler.from_pretrained(folder, subfolder="scheduler"))
        if os.path.isdir(os.path.join(folder, "image_noising_scheduler")):
            found["image_noising_scheduler"] = DDPMScheduler.from_pretrained(
                folder, subfolder="image_noising_scheduler")
        return found

    # Interpolation: 8 keyframes (16x24) -> 29 frames, windows called in order as run_inference.py does.
    keyframes = rng.uniform(-1, 1, (8, 16, 24, 3)).astype(np.float32)
    init, steps_noise = normal(5, 16, 24, 3), normal(STEPS, 5, 16, 24, 3)
    unet = UNet3DConditionModel.from_pretrained(os.path.join(pipes, "interpolation"), subfolder="unet").eval().double()
    pipe = TextToVideoIFInterpPipeline(tokenizer=None, text_encoder=None, unet=unet, feature_extractor=None,
                                       **schedulers_of("interpolation"))
    pipe.scheduler.set_timesteps(STEPS)
    draws = step_draws(steps_noise, pipe.scheduler.timesteps, frame_first)
    video = torch.zeros((1, 3, 29, 16, 24))
    for i in range(7):
        window = torch.zeros((1, 3, 5, 16, 24))
        window[:, :, 0], window[:, :, -1] = images_to_torch(keyframes[i:i + 2])[:, None].unbind(0)
        noise.queue = list(draws)
        out = pipe(pixel_values=window, num_frames=5, height=16, width=24, num_inference_steps=STEPS,
                   guidance_scale=GUIDANCE, output_type="pt", init_noise=video_to_torch(init), cond_interpolation=True,
                   **embeds).frames
        video[:, :, 4 * i:4 * i + 5] = out
    np.savez(os.path.join(args.out, "interpolation.npz"), keyframes=keyframes, text=text, negative_text=negative_text,
             init=init, steps=steps_noise, out=video_from_torch(video), guidance=GUIDANCE, num_steps=STEPS,
             weights_sha256=sha256(weights_file(os.path.join(pipes, "interpolation"))))

    # sr1 first frame by IF-II: 8x8 -> 32x32 at noise level 150.
    image = rng.uniform(-1, 1, (8, 8, 3)).astype(np.float32)
    init, augmentation, steps_noise = normal(32, 32, 3), normal(32, 32, 3), normal(STEPS, 32, 32, 3)
    unet2d = UNet2DConditionModel.from_pretrained(os.path.join(pipes, "sr1_image"), subfolder="unet").eval().double()
    pipe = IFSuperResolutionPipeline(tokenizer=None, text_encoder=None, unet=unet2d, safety_checker=None,
                                     feature_extractor=None, watermarker=None, requires_safety_checker=False,
                                     **schedulers_of("sr1_image"))
    pipe.scheduler.set_timesteps(STEPS)
    noise.queue = [frame_first(init[None]), frame_first(augmentation[None])]
    noise.queue += step_draws(steps_noise[:, None], pipe.scheduler.timesteps, frame_first)
    first = pipe(image=images_to_torch(image[None]), height=32, width=32, num_inference_steps=STEPS,
                 guidance_scale=GUIDANCE,
                 noise_level=150, output_type="pt", **embeds).images
    first_frame = first[0].float().numpy().transpose(1, 2, 0)
    np.savez(os.path.join(args.out, "sr1_image.npz"), image=image, text=text, negative_text=negative_text, init=init,
             augmentation=augmentation, steps=steps_noise, out=first_frame, guidance=GUIDANCE, noise_level=150,
             num_steps=STEPS, weights_sha256=sha256(weights_file(os.path.join(pipes, "sr1_image"))))

    # sr1 windows: 15 frames 8x8 -> 32x32, windows of 8 with stride 7, anchored on the IF-II frame.
    frames = rng.uniform(-1, 1, (15, 8, 8, 3)).astype(np.float32)
    init, augmentation, steps_noise = normal(8, 32, 32, 3), normal(8, 32, 32, 3), normal(STEPS, 8, 32, 32, 3)
    unet = UNet3DConditionModel.from_pretrained(os.path.join(pipes, "sr1"), subfolder="unet").eval().double()
    pipe = TextToVideoIFSuperResolutionPipeline_Cond(tokenizer=None, text_encoder=None, unet=unet,
                                                      feature_extractor=None, **schedulers_of("sr1"))
    pipe.scheduler.set_timesteps(STEPS)
    draws = step_draws(steps_noise, pipe.scheduler.timesteps, frame_first)
    video = torch.zeros((1, 3, 15, 32, 32))
    for start in range(0, 15 - 8 + 1, 7):
        anchor = video_to_torch(first_frame[None]) if start == 0 else video[:, :, start:start + 1]
        noise.queue = [video_to_torch(init).numpy(), video_to_torch(augmentation).numpy(), *draws]
        out = pipe(image=video_to_torch(frames[start:start + 8]), first_frame_cond=anchor, height=32, width=32,
                   num_inference_steps=STEPS, guidance_scale=GUIDANCE, noise_level=250, output_type="pt",
                   **embeds).frames
        video[:, :, start:start + 8] = out
    np.savez(os.path.join(args.out, "sr1.npz"), frames=frames, first_frame=first_frame, text=text,
             negative_text=negative_text, init=init, augmentation=augmentation, steps=steps_noise,
             out=video_from_torch(video), guidance=GUIDANCE, noise_level=250, window=8, stride=7, num_steps=STEPS,
             weights_sha256=sha256(weights_file(os.path.join(pipes, "sr1"))))

    # sr2: 5 frames 32x48 in [0, 1], strength 0.8 of 4 steps, CLIP prompt and negative prompt.
    folder = os.path.join(pipes, "sr2")
    video01 = rng.uniform(0, 1, (5, 32, 48, 3)).astype(np.float32)
    posterior, init = normal(5, 16, 24, 4), normal(5, 16, 24, 4)
    pipe = VideoToVideoSDPipeline(
        vae=AutoencoderKL.from_pretrained(folder, subfolder="vae").eval().double(),
        text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval().double(),
        tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        unet=ModelScopeUNet.from_pretrained(folder, subfolder="unet").eval().double(),
        scheduler=DDIMScheduler.from_pretrained(folder, subfolder="scheduler"))
    pipe.enable_vae_slicing()
    noise.queue = [frame_first(posterior), frame_first(init)]
    video = torch.from_numpy(np.moveaxis(video01, -1, 1))[None].double()
    out = pipe(PROMPT, negative_prompt=NEGATIVE_PROMPT, video=video,
               strength=0.8, num_inference_steps=4, guidance_scale=GUIDANCE, output_type="pt").frames
    assert not noise.queue, "sr2 did not use all the queued draws"
    np.savez(os.path.join(args.out, "sr2.npz"), video01=video01, posterior=posterior, init=init,
             out=video_from_torch(out), prompt=PROMPT, negative_prompt=NEGATIVE_PROMPT, strength=0.8, num_steps=4,
             guidance=GUIDANCE, weights_sha256=sha256(weights_file(folder)))


if __name__ == "__main__":
    main()
