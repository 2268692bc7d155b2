"""The attention cores on the CPU at the keyframe UNet's sizes, against torch's fused attention.

For each shape (batch x frames, queries, keys, heads, head size) of the fixture UNet at 8x40x64,
times the forward and the forward + backward (gradients of q, k and v) of every CPU path of
``attention_core`` (``xla``, ``blocked``, ``cpu_flash``) and of torch's
``scaled_dot_product_attention`` (2 threads) in the same process, median of ``--repeats`` calls,
and prints each path's largest difference from the plain form. torch comes with the test extra.

    PYTHONPATH=$PWD python benchmarks/attention_cpu.py
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from unet_forward import time_calls  # noqa: E402

# (batch, q_len, k_len, heads, head_dim): spatial self-attention at 20x32 (+77 text tokens as
# keys) and 10x16, cross-attention at 20x32, temporal attention over 8 frames at 20x32.
SHAPES = ((16, 640, 717, 2, 16), (16, 160, 237, 4, 16), (16, 640, 77, 2, 16), (2, 8, 8, 1280, 16))
IMPLEMENTATIONS = ("xla", "blocked", "cpu_flash")


def median_ms(fn, repeats: int) -> float:
    return float(np.median(time_calls(fn, warmup=1, repeats=repeats))) * 1e3


def jax_times(shape, implementation: str, repeats: int):
    import jax
    import jax.numpy as jnp

    from vmc_jax.kernels import attention_core

    batch, q_len, k_len, heads, d = shape
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v = (jax.random.normal(key, (batch, n, heads, d)) for key, n in zip(keys, (q_len, k_len, k_len)))
    cotangent = jax.random.normal(keys[3], q.shape)
    attention = functools.partial(attention_core.dot_product_attention, scale=d ** -0.5,
                                  implementation=implementation)
    forward = jax.jit(attention)
    gradients = jax.jit(lambda q, k, v: jax.vjp(attention, q, k, v)[1](cotangent))
    plain = attention_core.plain_attention(q, k, v, d ** -0.5)
    error = float(jnp.abs(forward(q, k, v) - plain).max())
    return (median_ms(lambda: forward(q, k, v).block_until_ready(), repeats),
            median_ms(lambda: jax.block_until_ready(gradients(q, k, v)), repeats), error)


def torch_times(shape, repeats: int):
    import torch

    torch.set_num_threads(2)
    batch, q_len, k_len, heads, d = shape
    q, k, v = (torch.randn(batch, heads, n, d) for n in (q_len, k_len, k_len))
    attention = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad():
        forward = median_ms(lambda: attention(q, k, v), repeats)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    cotangent = torch.randn(batch, heads, q_len, d)
    backward = median_ms(lambda: torch.autograd.grad(attention(q, k, v), (q, k, v), cotangent), repeats)
    return forward, backward


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    print("shape (batch, q, k, heads, d): ms forward / forward+backward, max |difference| from the plain form")
    for shape in SHAPES:
        cells = []
        for implementation in IMPLEMENTATIONS:
            forward, backward, error = jax_times(shape, implementation, args.repeats)
            cells.append(f"{implementation} {forward:.2f} / {backward:.2f} ({error:.1e})")
        forward, backward = torch_times(shape, args.repeats)
        cells.append(f"torch sdpa {forward:.2f} / {backward:.2f}")
        print(f"{shape}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
