"""Unified sparse paged decode attention: the Pallas (Triton) kernel.

One program per (row b, KV head k, selection list gs, key split). The program derives its page
list itself from the head's mode (DENSE: pages 0..n-1; STREAM: sink pages + window pages;
SELECT: its selected pages + the current page (once), or every page while the row fits the
budget),
so no list is materialised between kernels. It walks its share of the list `pages_per_block`
pages at a time, gathering whole pages of the shared pool by physical id, and keeps an f32
online-softmax partial (o, m, l) for all G query heads of the KV head at once: a page loaded
for a GQA group is read once. Full blocks run unmasked; the block holding the current page and
every block of a streaming head are masked token-exactly, with values of masked keys zeroed so
NaN in unused slots never leaks. A program writes partials only for the query heads that read
its list (the others get weight zero), so the partials of every (list, split) of a KV head
merge after by one log-sum-exp over both axes (flash-decoding), with no gather. Quantized pages
(`kv_quant`) are dequantized per tile: a static format's scale multiplies the logits and the
output; a per-token one is applied to the codes before the dots.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import kv_quant
from pallas_kernels._compat import LOG2_E, NEG_INF, check_power_of_two, next_power_of_two, whole
from pallas_kernels.layout import SELECT, STREAM, sink_pages



@dataclasses.dataclass(frozen=True)
class DecodeTuning:
    """How the decode op tiles its work; passed explicitly (benchmarks sweep it).

    Defaults measured on the H200 (experiments/results/h200/decode_attention.json, e2e.json):
    one 64-token page per loop step (a contiguous tile from a scalar page id) beat gathering
    two pages a step by 1.7x; ~2048 programs (about 16 per SM) and 3 pipeline stages were best
    or within 3%. A split walks at least `min_pages_per_split` entries, fewer (down to 2) only
    while the grid would otherwise run under `min_programs` programs (about 2 per SM): a whole
    B=1 dense 4K decode step (8 programs of 64 pages) ran 4.56-4.60 ms with 2-page splits
    against 4.73 with 8, while LServe's lists and B >= 4 were as fast or faster with 8.
    """

    target_programs: int = 2048
    min_pages_per_split: int = 8
    min_programs: int = 256
    num_warps: int = 4
    num_stages: int = 3
    merge_chunk: int = 16  # partials merged per loop step of the merge kernel
    merge_block_h: int = 32  # head-dim slice of one merge program

    def __post_init__(self):
        check_power_of_two("DecodeTuning", num_warps=self.num_warps,
                           min_pages_per_split=self.min_pages_per_split,
                           merge_chunk=self.merge_chunk, merge_block_h=self.merge_block_h)
        for name in ("target_programs", "min_programs", "num_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"DecodeTuning.{name}={getattr(self, name)} must be >= 1")


@dataclasses.dataclass(frozen=True)
class DecodeBlocks:
    pages_per_block: int  # pages per loop step (x page_size keys); 1 loads one contiguous tile
    pages_per_split: int  # list entries one program walks
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        check_power_of_two("DecodeBlocks", pages_per_block=self.pages_per_block,
                           pages_per_split=self.pages_per_split, num_warps=self.num_warps)
        if self.pages_per_split % self.pages_per_block:
            raise ValueError(f"DecodeBlocks.pages_per_split={self.pages_per_split} must be a "
                             f"multiple of pages_per_block={self.pages_per_block}")

    @classmethod
    def for_shape(cls, page_size: int, list_width: int, programs: int,
                  tuning: DecodeTuning = DecodeTuning(), block_tokens: int = 64) -> DecodeBlocks:
        """Blocks of ~block_tokens keys (at least one page); enough key splits that about
        tuning.target_programs programs run, each walking at least min_pages_per_split
        entries, or fewer (halved down to 2) while fewer than min_programs would run."""
        ppb = max(1, block_tokens // page_size)
        splits = max(1, tuning.target_programs // max(1, programs))
        floor = tuning.min_pages_per_split
        while floor > 2 and programs * -(-list_width // floor) < tuning.min_programs:
            floor //= 2
        pps = next_power_of_two(max(ppb, floor, -(-list_width // splits)))
        return cls(pages_per_block=ppb, pages_per_split=pps, num_warps=tuning.num_warps,
                   num_stages=tuning.num_stages)


def _decode_kernel(
    # inputs
    q_ref,  # [Gp, H] the KV head's query heads (rows >= G are zero padding)
    k_ref,  # [P, Np, H] key pool (or its codes in format `kind`), gathered by physical page
    v_ref,  # [P, Np, H] value pool (or codes)
    ks_ref,  # key scales of `kind` (kv_quant: [L, B, K] static, [P, 2, Np] per token)
    vs_ref,  # value scales
    table_ref,  # [B, L, K, M] int32 logical -> physical page
    sel_ref,  # [L, B, K, Gs, W] int32 selected logical pages (-1 padded)
    lengths_ref,  # [B] int32 tokens held per row (the current token is the last)
    modes_ref,  # [L, K] int32 head modes
    layer_ref,  # [1] int32 the layer (data, so that one compiled kernel serves every layer)
    # outputs
    o_ref,  # [Gp, H] f32 unnormalised partial output of this split (rows >= G not written)
    m_ref,  # [Gp] f32 running max of the logits (log2 units)
    l_ref,  # [Gp] f32 softmax denominator
    *,
    scale: float,
    sink: int,
    local: int,
    budget_pages: int,
    heads_per_list: int,
    pages_per_block: int,
    pages_per_split: int,
    kind: str,
):
    b, kh, g, split = (pl.program_id(i) for i in range(4))
    gp, h = q_ref.shape
    n_p = k_ref.shape[1]
    layer = layer_ref[0]
    m_max, width = table_ref.shape[3], sel_ref.shape[4]
    block = pages_per_block * n_p
    sinks = sink_pages(sink, n_p)
    t = lengths_ref[b] - 1
    n_pages = t // n_p + 1
    mode = modes_ref[layer, kh]
    streaming = mode == STREAM
    sparse = (mode == SELECT) & (n_pages > budget_pages)
    n_sel = jnp.sum((sel_ref[layer, b, kh, g, pl.ds(0, width)] >= 0).astype(jnp.int32))
    # an anchored selection ends with the page current when it was made: listed once
    last = sel_ref[layer, b, kh, g, jnp.maximum(n_sel - 1, 0)]
    n_sel = jnp.where((n_sel > 0) & (last == n_pages - 1), n_sel - 1, n_sel)
    n_sink = jnp.minimum(sinks, n_pages)
    first = jnp.minimum(jnp.maximum((t - local) // n_p, sinks), n_pages)
    count = jnp.where(sparse, n_sel + 1, jnp.where(streaming, n_sink + n_pages - first, n_pages))
    count = jnp.where(sparse | (g == 0), count, 0)  # only selections differ between lists
    start = split * pages_per_split
    steps = jnp.clip(pl.cdiv(count - start, pages_per_block), 0,
                     pages_per_split // pages_per_block)
    # blocks before the one holding the list's last entry are full and fully visible
    clean = jnp.where(streaming, 0, jnp.clip((count - 1 - start) // pages_per_block, 0, steps))
    # int4 codes hold channels < H/2 and >= H/2 as two nibbles: the dots run per half
    halves = (pl.ds(0, h // 2), pl.ds(h // 2, h // 2))
    parts = halves if kind == "int4" else (pl.ds(0, h),)
    q = [q_ref[:, part] for part in parts]
    static = kind in kv_quant.STATIC
    if static:  # a scale per (row, layer, KV head): applied to the logits and the output
        k_scale, v_scale = ks_ref[layer, b, kh], vs_ref[layer, b, kh]
    entry = jax.lax.broadcasted_iota(jnp.int32, (pages_per_block,), 0)
    in_page = jax.lax.broadcasted_iota(jnp.int32, (pages_per_block, n_p), 1)
    of_entry = jax.lax.broadcasted_iota(jnp.int32, (pages_per_block, n_p), 0)

    def pages(base):
        """(logical pages, physical pages) of list entries base .. base + pages_per_block - 1;
        scalars when a block is one page (its keys then load as one contiguous tile)."""
        e = base if pages_per_block == 1 else base + entry
        if pages_per_block == 1:
            chosen = sel_ref[layer, b, kh, g, jnp.minimum(base, width - 1)]
        else:
            chosen = sel_ref[layer, b, kh, g,
                             pl.ds(jnp.minimum(base, width - pages_per_block), pages_per_block)]
        logical = jnp.where(sparse, jnp.where(e < n_sel, chosen, n_pages - 1),
                            jnp.where(streaming & (e >= n_sink), first + e - n_sink, e))
        logical = jnp.clip(logical, 0, m_max - 1)
        return logical, table_ref[b, layer, kh, logical]

    def load(ref, scale_ref, phys):
        """The block's keys or values as `parts` [block, H or H/2] in q's dtype (a static
        format's scale is applied by the caller)."""
        x = ref[phys]  # [Np, W], or gathered [ppb, Np, W]
        x = x.reshape(block, x.shape[-1])
        if kind == "auto" or static:
            return [x.astype(q_ref.dtype)]
        sc, zero = (scale_ref[phys, i].reshape(block)[:, None] for i in (0, 1))
        return [(c * sc + zero).astype(q_ref.dtype) for c in kv_quant.unpack(x, kind)]

    def step(i, carry, masked: bool):
        o, m, l = carry
        base = start + i * pages_per_block
        logical, phys = pages(base)
        keys, values = load(k_ref, ks_ref, phys), load(v_ref, vs_ref, phys)
        s = sum(plgpu.dot(qp, kp.T) for qp, kp in zip(q, keys))  # [Gp, block] f32
        s = s * (scale * LOG2_E * (k_scale if static else 1.0))
        if masked and pages_per_block == 1:
            pos = logical * n_p + jax.lax.broadcasted_iota(jnp.int32, (n_p,), 0)
            used = jnp.broadcast_to(base < count, (block,))
        elif masked:
            pos = (logical[:, None] * n_p + in_page).reshape(block)
            used = (base + of_entry < count).reshape(block)
        if masked:
            window = (pos < sink) | (pos >= t - local)
            visible = used & (pos <= t) & (window | ~streaming)
            s = jnp.where(visible[None, :], s, NEG_INF)
            values = [jnp.where(visible[:, None], x, jnp.zeros_like(x)) for x in values]
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        if masked:
            p = jnp.where(visible[None, :], p, 0.0)
        o = tuple(alpha[:, None] * acc + plgpu.dot(p.astype(x.dtype), x)
                  for acc, x in zip(o, values))
        return o, m_new, alpha * l + jnp.sum(p, axis=1)

    width = h // len(parts)
    carry = (tuple(jnp.zeros((gp, width), jnp.float32) for _ in parts),
             jnp.full((gp,), NEG_INF, jnp.float32), jnp.zeros((gp,), jnp.float32))
    carry = jax.lax.fori_loop(0, clean, functools.partial(step, masked=False), carry)
    o, m, l = jax.lax.fori_loop(clean, steps, functools.partial(step, masked=True), carry)
    # query head r reads list r // heads_per_list where selections differ, list 0 elsewhere
    # (the other lists of such a head are empty: count is 0 there)
    head = jax.lax.broadcasted_iota(jnp.int32, (gp,), 0)
    owned = ~sparse | (head // heads_per_list == g)
    # only the G real rows of o are stored (the merge reads no others): at ~2048 programs the
    # padding rows would be most of the partials' bytes
    real = jnp.broadcast_to((head < heads_per_list * sel_ref.shape[3])[:, None], (gp, width))
    for part, acc in zip(parts, o):
        acc = acc * v_scale if static else acc
        plgpu.store(o_ref.at[:, part], jnp.where(owned[:, None], acc, 0.0), mask=real)
    m_ref[...] = jnp.where(owned, m, NEG_INF)
    l_ref[...] = jnp.where(owned, l, 0.0)


@functools.partial(jax.jit, static_argnames=("scale", "sink", "local", "budget_pages",
                                             "heads_per_list", "splits", "blocks", "kind",
                                             "interpret"))
def decode_partials(q, k_pool, v_pool, k_scale, v_scale, table, selected, lengths, modes, layer,
                    *, scale: float, sink: int, local: int, budget_pages: int,
                    heads_per_list: int, splits: int, blocks: DecodeBlocks, kind: str = "auto",
                    interpret: bool = False):
    """Runs the kernel. q: [B, K, Gp, H]; pools: values, or codes of `kind` with their scales
    (`kv_quant`; unused when `kind` is 'auto'); table: [B, L, K, M]; selected: [L, B, K, Gs, W];
    lengths: [B]; modes: [L, K] int32; layer: [1] int32; heads_per_list = G / Gs. Returns o
    [B, K, Gs, splits, Gp, H] f32 (rows >= G unwritten) and m, l [B, K, Gs, splits, Gp] f32:
    weight zero (m NEG_INF, l 0, o 0) where a query head does not read the list."""
    b, kh, gp, h = q.shape
    gs = selected.shape[3]
    kernel = functools.partial(
        _decode_kernel, scale=scale, sink=sink, local=local, budget_pages=budget_pages,
        heads_per_list=heads_per_list, pages_per_block=blocks.pages_per_block,
        pages_per_split=blocks.pages_per_split, kind=kind)

    return pl.pallas_call(
        kernel,
        grid=(b, kh, gs, splits),
        in_specs=[
            pl.BlockSpec((None, None, gp, h), lambda i, j, g, _: (i, j, 0, 0)),
            whole(k_pool), whole(v_pool), whole(k_scale), whole(v_scale), whole(table),
            whole(selected), whole(lengths), whole(modes), whole(layer),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, None, gp, h), lambda i, j, g, x: (i, j, g, x, 0, 0)),
            pl.BlockSpec((None, None, None, None, gp), lambda i, j, g, x: (i, j, g, x, 0)),
            pl.BlockSpec((None, None, None, None, gp), lambda i, j, g, x: (i, j, g, x, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, kh, gs, splits, gp, h), jnp.float32),
            jax.ShapeDtypeStruct((b, kh, gs, splits, gp), jnp.float32),
            jax.ShapeDtypeStruct((b, kh, gs, splits, gp), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps,
                                             num_stages=blocks.num_stages),
        interpret=interpret,
        name="sparse_paged_decode",
    )(q, k_pool, v_pool, k_scale, v_scale, table, selected, lengths, modes, layer)
