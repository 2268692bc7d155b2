"""The attention core of every model, with one implementation chosen per backend and shape.

``dot_product_attention`` takes ``(batch, seq, heads, head_dim)`` and returns the same layout.
``implementation`` is one of:

* ``"xla"``: the plain form; the score matrix is materialised (fastest for short sequences);
* ``"blocked"``: memory-efficient attention, an online softmax over key blocks (``lax.scan``)
  for one query block at a time (``lax.map``), with FlashAttention's backward pass (a custom
  VJP that recomputes each block's scores); O(n) memory both ways, float32 accumulation;
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU, fp16 / bf16);
* ``"pallas_tpu"``: the Pallas flash-attention kernel of ``jax.experimental.pallas.ops.tpu``;
* ``"cpu_flash"``: FlashAttention forward and backward as native CPU kernels
  (``vmc_jax/kernels/flash_attention_cpu.cc``, built on first use by ``vmc_jax/kernels/cpu_flash.py``);
  O(n) memory, float32 inside;
* ``"auto"``: the kernel of the backend when it applies (on the CPU: from CPU_FLASH_MIN_SCORES
  scores on, with one CPU device), else blocked for long sequences and the plain form for short
  ones.

A kernel that cannot run on the current backend or for these inputs falls back to what
``"auto"`` would pick without it, with one log line per reason.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from vmc_jax.kernels import cpu_flash

IMPLEMENTATIONS = ("auto", "xla", "blocked", "cudnn", "pallas_tpu", "cpu_flash")
BACKEND_KERNELS = {"gpu": "cudnn", "tpu": "pallas_tpu", "cpu": "cpu_flash"}

# From this many scores per (batch, head) on, "auto" uses blocked attention where no kernel
# applies: on the CPU small blocks stay in cache and beat the plain form from a few hundred
# tokens on, forward and backward (measured in benchmarks/README.md).
BLOCKED_MIN_SCORES = 256 * 256
# Block sizes of blocked attention, measured on the CPU at the UNets' sizes (benchmarks/README.md):
# long key blocks mean fewer online-softmax rescalings, and a sequence up to twice a block is one
# block (no loop trip, no padded block).
QUERY_BLOCK = 128
KEY_BLOCK = 1024
# From this many scores per (batch, head) on, "auto" uses the CPU kernel where it is built: ~2x
# faster forward than blocked or plain attention from 160x237 scores on, and no faster at
# 160x77; the plain form stays for the temporal attentions' few frames (benchmarks/README.md).
CPU_FLASH_MIN_SCORES = 128 * 128
# The CPU kernel's queries a task (at most kMaxRows, a multiple of kTileR) and the multiple its
# keys are padded to (kTileC), as in kernels/flash_attention_cpu.cc.
CPU_FLASH_ROWS = 32
CPU_FLASH_ROW_TILE = 4
CPU_FLASH_KEYS = 16

_log = logging.getLogger(__name__)
_MASKED = float(jnp.finfo(jnp.float32).min)
# The backend (and device count) "auto" resolves for: the process's own, unless a program is being
# traced for other devices (`vmc_jax.jobs.plan` compiles for a TPU topology on a CPU host).
_TRACING_FOR: list[tuple[str, int]] = []


@contextlib.contextmanager
def tracing_for(backend: str, devices: int):
    """Within it, "auto" picks the kernels of ``backend`` with ``devices`` devices, not the process's."""
    _TRACING_FOR.append((backend, devices))
    try:
        yield
    finally:
        _TRACING_FOR.pop()


@functools.lru_cache(maxsize=None)
def _log_fallback(requested: str, chosen: str, reason: str) -> None:
    """Logs one line per distinct fallback (cached so a traced model does not repeat it)."""
    _log.warning("attention: %s unavailable (%s); using %s", requested, reason, chosen)


def _kernel_unsupported(implementation: str, backend: str, q_len: int, k_len: int, head_dim: int,
                        dtype: jnp.dtype, has_bias: bool, has_mask: bool) -> str | None:
    """Why ``implementation`` (a kernel) cannot run here, or None when it can."""
    if implementation == "cudnn":
        if backend != "gpu":
            return f"backend is {backend}, cuDNN needs a GPU"
        if jnp.dtype(dtype) not in (jnp.float16, jnp.bfloat16):
            return f"cuDNN attention needs float16 or bfloat16 inputs, got {jnp.dtype(dtype).name}"
        if head_dim > 128 or head_dim % 8:
            return f"cuDNN attention needs a head size that is a multiple of 8 up to 128, got {head_dim}"
        if q_len % 2 or k_len % 2:  # the forward would run, but training would fail at the first step
            return f"cuDNN attention has no backward pass for odd sequence lengths, got {q_len} and {k_len}"
        if has_bias or has_mask:
            return "cuDNN path here takes no bias or mask"
        return None
    if implementation == "pallas_tpu":
        if backend != "tpu":
            return f"backend is {backend}, the Pallas kernel needs a TPU"
        if q_len % 128 or k_len % 128:
            return f"the Pallas kernel needs sequence lengths that are multiples of 128, got {q_len} and {k_len}"
        if has_mask:
            return "the Pallas path here takes no mask"
        return None
    if implementation == "cpu_flash":
        if backend != "cpu":
            return f"backend is {backend}, the kernel is for the CPU"
        if head_dim % 8:
            return f"the CPU kernel needs a head size that is a multiple of 8, got {head_dim}"
        if has_bias or has_mask:
            return "the CPU kernel takes no bias or mask"
        return cpu_flash.unavailable_reason()
    if implementation == "blocked" and (has_bias or has_mask):
        return "blocked attention takes no bias or mask"
    return None


def resolve_implementation(requested: str, *, backend: str, q_len: int, k_len: int, head_dim: int,
                           dtype: jnp.dtype = jnp.float32, has_bias: bool = False,
                           has_mask: bool = False, devices: int = 1) -> str:
    """The implementation that runs for ``requested`` on ``backend`` with these inputs.

    ``devices`` is the process's device count: "auto" leaves the CPU kernel out on several CPU
    devices, as an FFI call has no sharding rule (XLA would gather its operands onto every one).
    """
    if requested not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {requested!r} is not one of {IMPLEMENTATIONS}")
    args = (backend, q_len, k_len, head_dim, dtype, has_bias, has_mask)
    portable = "blocked" if q_len * k_len >= BLOCKED_MIN_SCORES else "xla"
    if _kernel_unsupported("blocked", *args):
        portable = "xla"
    if requested == "auto":
        kernel = BACKEND_KERNELS.get(backend)
        if kernel == "cpu_flash" and (q_len * k_len < CPU_FLASH_MIN_SCORES or devices > 1):
            return portable
        return kernel if kernel and not _kernel_unsupported(kernel, *args) else portable
    reason = _kernel_unsupported(requested, *args)
    if reason is None:
        return requested
    fallback = "xla" if requested == "blocked" else portable
    _log_fallback(requested, fallback, reason)
    return fallback


def plain_attention(query: jax.Array, key: jax.Array, value: jax.Array, scale: float,
                    bias: jax.Array | None = None, mask: jax.Array | None = None) -> jax.Array:
    """Softmax attention with the whole score matrix; scores and softmax in float32.

    The softmax is normalised after the value product (one pass less over the scores).
    """
    logits = jnp.einsum("bqnh,bknh->bnqk", query, key, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        logits = jnp.where(mask, logits, _MASKED)
    weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
    out = jnp.einsum("bnqk,bknh->bqnh", weights.astype(value.dtype), value, preferred_element_type=jnp.float32)
    total = weights.sum(-1).transpose(0, 2, 1)[..., None]
    return (out / total).astype(value.dtype)


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    extra = -x.shape[axis] % multiple
    return jnp.pad(x, [(0, extra if a == axis else 0) for a in range(x.ndim)]) if extra else x


def _block_scores(q: jax.Array, k: jax.Array, start: jax.Array, scale: float, k_len: int) -> jax.Array:
    """Scaled float32 scores of a query block against a key block; padded keys get _MASKED."""
    s = jnp.einsum("bnqh,bnkh->bnqk", q, k, preferred_element_type=jnp.float32) * scale
    if k_len % k.shape[2]:  # the last key block is padded
        s = jnp.where(start + jnp.arange(k.shape[2]) < k_len, s, _MASKED)
    return s


def _key_starts(keys: jax.Array) -> jax.Array:
    return jnp.arange(keys.shape[0]) * keys.shape[3]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _flash(queries: jax.Array, keys: jax.Array, values: jax.Array, scale: float, k_len: int) -> jax.Array:
    """Blocked attention over (blocks, batch, heads, block, d) operands; see ``blocked_attention``."""
    return _flash_forward(queries, keys, values, scale, k_len)[0]


def _flash_forward(queries, keys, values, scale, k_len):
    """Output blocks and the log-sum-exp of every query's scores (all the backward pass keeps)."""

    def one_query_block(q):
        def step(carry, block):
            top, total, acc = carry
            k, v, start = block
            s = _block_scores(q, k, start, scale, k_len)
            new_top = jnp.maximum(top, s.max(-1))
            p = jnp.exp(s - new_top[..., None])
            keep = jnp.exp(top - new_top)
            acc = acc * keep[..., None] + jnp.einsum("bnqk,bnkh->bnqh", p.astype(v.dtype), v,
                                                      preferred_element_type=jnp.float32)
            return (new_top, total * keep + p.sum(-1), acc), None

        shape = q.shape[:-1]
        init = (jnp.full(shape, _MASKED, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros((*shape, values.shape[-1]), jnp.float32))
        (top, total, acc), _ = jax.lax.scan(step, init, (keys, values, _key_starts(keys)))
        return (acc / total[..., None]).astype(values.dtype), top + jnp.log(total)

    out, logsumexp = jax.lax.map(one_query_block, queries)
    return out, (queries, keys, values, out, logsumexp)


def _flash_backward(scale, k_len, residuals, d_out):
    """FlashAttention's backward: scores recomputed block by block from the saved log-sum-exp."""
    queries, keys, values, out, logsumexp = residuals
    # The softmax's own term of dS = P * (dP - rowsum(dO * O)), one number a query.
    d_rows = jnp.einsum("xbnqh,xbnqh->xbnq", d_out, out, preferred_element_type=jnp.float32)

    def one_query_block(carry, block):
        d_keys, d_values = carry
        q, d_o, lse, d_row = block

        def step(d_q, key_block):
            k, v, start = key_block
            p = jnp.exp(_block_scores(q, k, start, scale, k_len) - lse[..., None])
            d_v = jnp.einsum("bnqk,bnqh->bnkh", p.astype(d_o.dtype), d_o, preferred_element_type=jnp.float32)
            d_p = jnp.einsum("bnqh,bnkh->bnqk", d_o, v, preferred_element_type=jnp.float32)
            d_s = (p * (d_p - d_row[..., None]) * scale).astype(q.dtype)
            d_q = d_q + jnp.einsum("bnqk,bnkh->bnqh", d_s, k, preferred_element_type=jnp.float32)
            d_k = jnp.einsum("bnqk,bnqh->bnkh", d_s, q, preferred_element_type=jnp.float32)
            return d_q, (d_k, d_v)

        d_q, (d_k, d_v) = jax.lax.scan(step, jnp.zeros(q.shape, jnp.float32), (keys, values, _key_starts(keys)))
        return (d_keys + d_k, d_values + d_v), d_q

    zeros = (jnp.zeros(keys.shape, jnp.float32), jnp.zeros(values.shape, jnp.float32))
    (d_keys, d_values), d_queries = jax.lax.scan(one_query_block, zeros, (queries, d_out, logsumexp, d_rows))
    return d_queries.astype(queries.dtype), d_keys.astype(keys.dtype), d_values.astype(values.dtype)


_flash.defvjp(_flash_forward, _flash_backward)


def _to_blocks(x: jax.Array, size: int) -> jax.Array:
    """(batch, seq, heads, d) -> (blocks, batch, heads, size, d), zero-padded; a sequence up to
    twice ``size`` is one block."""
    batch, length, heads, d = x.shape
    size = length if length <= 2 * size else size
    x = _pad_to(x, 1, size)
    return x.reshape(batch, -1, size, heads, d).transpose(1, 0, 3, 2, 4)


def _from_blocks(x: jax.Array, length: int) -> jax.Array:
    """The inverse of ``_to_blocks``: (blocks, batch, heads, size, d) -> (batch, length, heads, d)."""
    blocks, batch, heads, size, d = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(batch, blocks * size, heads, d)[:, :length]


def blocked_attention(query: jax.Array, key: jax.Array, value: jax.Array, scale: float,
                      query_block: int = QUERY_BLOCK, key_block: int = KEY_BLOCK) -> jax.Array:
    """FlashAttention-style attention: an online softmax over key blocks, one query block at a time.

    ``query_block`` / ``key_block`` are block sizes; a sequence up to twice its block is one block.
    O(n) memory forward and backward: the backward pass keeps only the inputs, the output and
    one log-sum-exp a query, and recomputes each block's scores (a custom VJP, so no
    forward-pass bookkeeping is differentiated). Float32 scores and accumulation.
    """
    out = _flash(_to_blocks(query, query_block), _to_blocks(key, key_block), _to_blocks(value, key_block),
                 scale, key.shape[1])
    return _from_blocks(out, query.shape[1])


def cpu_flash_attention(query: jax.Array, key: jax.Array, value: jax.Array, scale: float) -> jax.Array:
    """Attention by the native CPU kernels, forward and backward (float32 inside).

    (batch, seq, heads, head_dim) in and out; the head size must be a multiple of 8, and the
    kernels must be built (``cpu_flash.unavailable_reason()`` is None).
    """
    return _cpu_flash(query, key, value, scale)


def _cpu_kernel_layout(x: jax.Array, multiple: int) -> jax.Array:
    """(batch, seq, heads, ...) -> (batch, heads, seq zero-padded to a multiple, ...), float32."""
    return _pad_to(x.astype(jnp.float32), 1, multiple).swapaxes(1, 2)


def _cpu_kernel_rows(q_len: int) -> int:
    """Queries a kernel task: CPU_FLASH_ROWS, or all of a short sequence rounded up to a tile."""
    return min(CPU_FLASH_ROWS, -(-q_len // CPU_FLASH_ROW_TILE) * CPU_FLASH_ROW_TILE)


def _call_cpu_kernel(target: str, results: tuple, *operands: jax.Array, scale: float, k_len: int,
                     rows: int) -> tuple:
    """Runs one of the CPU kernels (built on first use) on float32 operands; float32 results."""
    reason = cpu_flash.unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the CPU attention kernel is unavailable: {reason}")
    shapes = tuple(jax.ShapeDtypeStruct(shape, jnp.float32) for shape in results)
    return jax.ffi.ffi_call(target, shapes, vmap_method="broadcast_all")(
        *operands, scale=np.float32(scale), k_len=np.int64(k_len), rows=np.int64(rows))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _cpu_flash(query, key, value, scale):
    return _cpu_flash_forward(query, key, value, scale)[0]


def _cpu_flash_forward(query, key, value, scale):
    q_len, rows = query.shape[1], _cpu_kernel_rows(query.shape[1])
    q = _cpu_kernel_layout(query, rows)
    out, logsumexp = _call_cpu_kernel(
        cpu_flash.FLASH_FORWARD, (q.shape, q.shape[:-1]), q,
        _cpu_kernel_layout(key, CPU_FLASH_KEYS).swapaxes(-1, -2), _cpu_kernel_layout(value, CPU_FLASH_KEYS),
        scale=scale, k_len=key.shape[1], rows=rows)
    out = out[:, :, :q_len].swapaxes(1, 2).astype(value.dtype)
    return out, (query, key, value, out, logsumexp)


def _cpu_flash_backward(scale, residuals, d_out):
    query, key, value, out, logsumexp = residuals
    q_len, k_len, rows = query.shape[1], key.shape[1], _cpu_kernel_rows(query.shape[1])
    k = _cpu_kernel_layout(key, CPU_FLASH_KEYS)
    # The softmax's own term of dS = P * (dP - rowsum(dO * O)), one number a query.
    d_row = jnp.einsum("bqnh,bqnh->bqn", d_out, out, preferred_element_type=jnp.float32)
    d_q, d_k, d_v = _call_cpu_kernel(
        cpu_flash.FLASH_BACKWARD, ((*logsumexp.shape, query.shape[-1]), k.shape, k.shape),
        _cpu_kernel_layout(query, rows), k, k.swapaxes(-1, -2),
        _cpu_kernel_layout(value, CPU_FLASH_KEYS).swapaxes(-1, -2), _cpu_kernel_layout(d_out, rows), logsumexp,
        _cpu_kernel_layout(d_row, rows), scale=scale, k_len=k_len, rows=rows)
    return tuple(g[:, :, :length].swapaxes(1, 2).astype(x.dtype)
                 for g, length, x in ((d_q, q_len, query), (d_k, k_len, key), (d_v, k_len, value)))


_cpu_flash.defvjp(_cpu_flash_forward, _cpu_flash_backward)


def _cudnn_attention(query, key, value, scale):
    return jax.nn.dot_product_attention(query, key, value, scale=scale, implementation="cudnn")


def _pallas_tpu_attention(query, key, value, scale, bias):
    from jax.experimental.pallas.ops.tpu import flash_attention  # imports Mosaic: only on TPU

    def heads_first(x):
        return x.transpose(0, 2, 1, 3)

    if bias is not None:  # the kernel takes the full (batch, heads, q, k) bias
        bias = jnp.broadcast_to(bias, (query.shape[0], query.shape[2], query.shape[1], key.shape[1]))
    out = flash_attention.flash_attention(heads_first(query), heads_first(key), heads_first(value),
                                          ab=bias, sm_scale=scale)
    return heads_first(out)


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    scale: float,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    causal: bool = False,
    implementation: str = "auto",
) -> jax.Array:
    """Scaled softmax attention, (batch, seq, heads, head_dim) in and out; float32 softmax.

    ``bias`` (broadcastable to (batch, heads, q, k)) is added to the scaled scores; keys where
    ``mask`` is False, and later keys when ``causal``, get the float32 minimum as their score.
    """
    if query.ndim != 4 or key.shape != value.shape[:-1] + key.shape[-1:] or query.shape[-1] != key.shape[-1]:
        raise ValueError(f"attention takes (batch, seq, heads, head_dim) query / key / value, got "
                         f"{query.shape}, {key.shape}, {value.shape}")
    if causal:
        not_later = jnp.tril(jnp.ones((query.shape[1], key.shape[1]), bool))
        mask = not_later if mask is None else mask & not_later
    backend, devices = _TRACING_FOR[-1] if _TRACING_FOR else (jax.default_backend(), jax.device_count())
    chosen = resolve_implementation(
        implementation, backend=backend, q_len=query.shape[1], k_len=key.shape[1],
        head_dim=query.shape[-1], dtype=query.dtype, has_bias=bias is not None, has_mask=mask is not None,
        devices=devices)
    if chosen == "blocked":
        return blocked_attention(query, key, value, scale)
    if chosen == "cudnn":
        return _cudnn_attention(query, key, value, scale)
    if chosen == "pallas_tpu":
        return _pallas_tpu_attention(query, key, value, scale, bias)
    if chosen == "cpu_flash":
        return cpu_flash_attention(query, key, value, scale)
    return plain_attention(query, key, value, scale, bias, mask)

