"""VMC fine-tuning: which parameters are tuned, and splitting params into tuned and frozen parts."""

from __future__ import annotations

import re
from typing import Any

from flax import traverse_util

# Every to_q / to_k / to_v of both attentions of every temporal transformer (the set VMC tunes).
TEMPORAL_ATTENTION_QKV = r"(^|/)temp_attentions_\d+/transformer_blocks_\d+/attn[12]/to_[qkv]/(kernel|bias)$"


def split_params(params: Any, pattern: str = TEMPORAL_ATTENTION_QKV) -> tuple[dict, dict]:
    """Splits params into (tuned, frozen) nested dicts: tuned are the leaves whose path matches.

    Paths are the '/'-joined Flax names, e.g. ``up_blocks_1/temp_attentions_0/.../attn1/to_q/kernel``.
    Taking gradients with respect to ``tuned`` alone keeps the frozen weights out of autodiff.
    """
    regex = re.compile(pattern)
    flat = traverse_util.flatten_dict(params)
    tuned = {k: v for k, v in flat.items() if regex.search("/".join(k))}
    if not tuned:
        raise ValueError(f"no parameter path matches {pattern!r}")
    frozen = {k: v for k, v in flat.items() if k not in tuned}
    return traverse_util.unflatten_dict(tuned), traverse_util.unflatten_dict(frozen)


def merge_params(tuned: Any, frozen: Any) -> dict:
    """The inverse of :func:`split_params`."""
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(frozen), **traverse_util.flatten_dict(tuned)})
