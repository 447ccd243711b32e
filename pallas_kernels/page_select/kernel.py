"""Page selection kernels: Quest upper-bound scores from per-logical-page key min/max, and an
exact top-k by radix select (no sort).

Both kernels read the layer's head modes and the row lengths, and skip what is never used:
programs of KV heads that do not SELECT load nothing (scores NEG_INF, lists all -1), and score
blocks that start at or past the row's last page load nothing (NEG_INF).
Scores: one program per (row b, KV head k, chunk of pages). For each block of pages it gathers
their statistics rows and computes, for every query head of the group, relu(q).kmax +
min(q, 0).kmin (equal to sum_h max(q kmax, q kmin) when kmax >= kmin) as two small dots per
logical slot, keeps the max over the slots of each page, and reduces the group when asked.
Top-k: one program per selection row. It maps scores to order-preserving uint32 keys and finds
the k-th largest key `radix_bits` bits at a time: up to 32 / radix_bits counting passes, each
a loop over chunks of the row's candidate pages that counts, for all 2^radix_bits values of
the next digit at once, the keys at or above it, and one block-wide reduction at its end. The
passes stop once exactly k keys share the fixed prefix (normal random scores of 512 to 4096
pages, k = 63: about 8 of 16 two-bit passes). A last pass writes the chosen page ids in
ascending order with prefix sums (ties go to the lower page).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._compat import NEG_INF, check_power_of_two, next_power_of_two, whole
from pallas_kernels.layout import SELECT

RADIX_BITS = (1, 2, 4)  # digit widths that divide 32 and keep the counts small


@dataclasses.dataclass(frozen=True)
class SelectTuning:
    """How the selection op tiles its work; passed explicitly (benchmarks sweep it).

    Defaults measured on the H200 (one Llama-3-8B layer, half the heads streaming; B=1 256K,
    B=8 128K, B=1 32K): ~2048 score programs (one 32-page block each at B=1 256K) beat 256
    pages a program by 1.1-1.7x; top-k with 2-bit digits beat 1 and 4 bits at B=1 256K and
    tied elsewhere; counting 16384 (key, digit) pairs a loop step (a 256K row of 4096 pages in
    one step) cut selection by 5-16% against 4096; a whole row of 16K pages with 4-bit digits
    at once took minutes to compile.
    """

    target_programs: int = 2048  # score programs to aim for
    radix_bits: int = 2  # top-k digit width: 1, 2 or 4 bits a counting pass
    topk_chunk: int = 16384  # keys x candidate digits counted per top-k loop step
    topk_warps: int = 4  # warps of a top-k program (one program per selection row)

    def __post_init__(self):
        if self.radix_bits not in RADIX_BITS:
            raise ValueError(f"SelectTuning.radix_bits={self.radix_bits} is invalid: use one of "
                             f"{RADIX_BITS}")
        check_power_of_two("SelectTuning", topk_chunk=self.topk_chunk,
                           topk_warps=self.topk_warps)
        if self.target_programs < 1:
            raise ValueError(f"SelectTuning.target_programs={self.target_programs} must be >= 1")


@dataclasses.dataclass(frozen=True)
class ScoreBlocks:
    pages_per_block: int = 32  # pages scored per dot (>= 16: Triton dot width)
    pages_per_program: int = 256
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        check_power_of_two("ScoreBlocks", pages_per_block=self.pages_per_block,
                           pages_per_program=self.pages_per_program, num_warps=self.num_warps)
        if self.pages_per_block < 16 or self.pages_per_program % self.pages_per_block:
            raise ValueError(f"ScoreBlocks.pages_per_block={self.pages_per_block} must be >= 16 "
                             f"and divide pages_per_program={self.pages_per_program}")

    @classmethod
    def for_shape(cls, width: int, rows: int, target_programs: int = 2048,
                  pages_per_block: int = 32, **kwargs) -> ScoreBlocks:
        """Blocks for `rows` (= B * K) score rows of `width` pages: pages_per_block capped
        at the row, and the fewest pages per program (at least one block) for which at most
        about `target_programs` programs run."""
        ppb = max(16, min(pages_per_block, next_power_of_two(width)))
        ppp = next_power_of_two(-(-width * rows // target_programs))
        return cls(pages_per_block=ppb, pages_per_program=max(ppb, ppp), **kwargs)


def _score_kernel(
    # inputs
    q_ref,  # [Gp, H] the KV head's query heads (rows >= G are zero)
    kmin_ref,  # [P * R, H] per-logical-page key minima (R logical pages per physical page)
    kmax_ref,  # [P * R, H] maxima
    table_ref,  # [B, L, K, M] int32 physical page of each logical page
    lengths_ref,  # [B] int32 tokens held per row
    modes_ref,  # [L, K] int32 head modes
    layer_ref,  # [1] int32 the layer (data, so that one compiled kernel serves every layer)
    # outputs
    s_ref,  # [Gs, pages_per_program] f32 physical-page scores (Gs = Gp, or 1 when reduced)
    *,
    rows: int,
    groups: int,
    group_reduce: str,
    page_size: int,
    pages_per_block: int,
):
    b, kh, chunk = (pl.program_id(i) for i in range(3))
    gp = q_ref.shape[0]
    per_program = s_ref.shape[1]
    n_blocks = per_program // pages_per_block
    layer = layer_ref[0]
    last = table_ref.shape[3] - 1
    n_pages = (lengths_ref[b] + page_size - 1) // page_size
    start = chunk * per_program
    live = jnp.clip(pl.cdiv(n_pages - start, pages_per_block), 0, n_blocks)
    live = jnp.where(modes_ref[layer, kh] == SELECT, live, 0)  # blocks holding a page of the row
    real = jax.lax.broadcasted_iota(jnp.int32, (gp, pages_per_block), 0) < groups

    def out(blk):
        return s_ref.at[:, pl.ds(pl.multiple_of(blk * pages_per_block, pages_per_block),
                                 pages_per_block)]

    @pl.when(live > 0)
    def _():
        q = q_ref[...]
        pos = jnp.maximum(q, jnp.zeros_like(q))
        neg = jnp.minimum(q, jnp.zeros_like(q))

        def score(blk, carry):
            index = start + blk * pages_per_block + jax.lax.broadcasted_iota(
                jnp.int32, (pages_per_block,), 0)
            held = index < n_pages
            ids = jnp.where(held, table_ref[b, layer, kh, jnp.minimum(index, last)], 0)  # 0: trash
            best = jnp.full((gp, pages_per_block), NEG_INF, jnp.float32)
            for r in range(rows):
                hi = kmax_ref[ids * rows + r]  # [pages_per_block, H]
                lo = kmin_ref[ids * rows + r]
                best = jnp.maximum(best, plgpu.dot(pos, hi.T) + plgpu.dot(neg, lo.T))
            if group_reduce == "sum":
                best = jnp.sum(jnp.where(real, best, 0.0), axis=0, keepdims=True)
            elif group_reduce == "max":
                best = jnp.max(jnp.where(real, best, NEG_INF), axis=0, keepdims=True)
            out(blk)[...] = jnp.where(held[None, :], best, NEG_INF)
            return carry

        jax.lax.fori_loop(0, live, score, 0)

    def skip(blk, carry):
        out(blk)[...] = jnp.full((s_ref.shape[0], pages_per_block), NEG_INF, jnp.float32)
        return carry

    jax.lax.fori_loop(live, n_blocks, skip, 0)


@functools.partial(jax.jit, static_argnames=("groups", "group_reduce", "page_size",
                                             "width", "blocks", "interpret"))
def score_pages(q, kmin, kmax, table, lengths, modes, layer, *, groups: int,
                group_reduce: str, page_size: int, width: int, blocks: ScoreBlocks,
                interpret: bool = False):
    """q: [B, K, Gp, H]; kmin, kmax: [P, R, H]; table: [B, L, K, M]; lengths: [B] int32;
    modes: [L, K] int32; layer: [1] int32. Returns [B, K, Gs, width] f32 (width a multiple of
    blocks.pages_per_program): NEG_INF at pages >= ceil(length / page_size) and for every
    head whose mode is not SELECT."""
    b, kh, gp, h = q.shape
    p, rows, _ = kmin.shape
    per = blocks.pages_per_program
    assert width % per == 0, (width, per)
    gs = gp if group_reduce == "none" else 1
    kernel = functools.partial(_score_kernel, rows=rows, groups=groups,
                               group_reduce=group_reduce, page_size=page_size,
                               pages_per_block=blocks.pages_per_block)
    flat = pl.BlockSpec((p * rows, h), lambda *_: (0, 0))
    return pl.pallas_call(
        kernel,
        grid=(b, kh, width // per),
        in_specs=[pl.BlockSpec((None, None, gp, h), lambda i, j, c: (i, j, 0, 0)), flat, flat,
                  whole(table), whole(lengths), whole(modes), whole(layer)],
        out_specs=pl.BlockSpec((None, None, gs, per), lambda i, j, c: (i, j, 0, c)),
        out_shape=jax.ShapeDtypeStruct((b, kh, gs, width), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps,
                                             num_stages=blocks.num_stages),
        interpret=interpret,
        name="page_scores",
    )(q, kmin.reshape(p * rows, h), kmax.reshape(p * rows, h), table, lengths, modes, layer)


def _topk_kernel(
    # inputs
    s_ref,  # [M'] f32 scores of one selection row (M' a power of two, >= W)
    lengths_ref,  # [B] int32 tokens held per row
    modes_ref,  # [L, K] int32 head modes
    layer_ref,  # [1] int32 the layer
    # outputs
    o_ref,  # [W] int32 chosen pages, ascending, then -1
    *,
    k: int,
    page_size: int,
    keep_sink_page: bool,
    radix_bits: int,
    chunk: int,
):
    b, kh = pl.program_id(0), pl.program_id(1)
    width = o_ref.shape[0]

    selecting = modes_ref[layer_ref[0], kh] == SELECT

    @pl.when(~selecting)
    def _():
        o_ref[...] = jnp.full(o_ref.shape, -1, jnp.int32)

    @pl.when(selecting)
    def _():
        candidates = (lengths_ref[b] + page_size - 1) // page_size - 1  # the current page apart
        live = jnp.clip(pl.cdiv(candidates, chunk), 0, s_ref.shape[0] // chunk)

        def keys(c):
            """Pages of chunk c, and their order-preserving keys (0 for non-candidates)."""
            page = c * chunk + jax.lax.broadcasted_iota(jnp.int32, (chunk,), 0)
            s = s_ref[pl.ds(pl.multiple_of(c * chunk, chunk), chunk)]
            if keep_sink_page:
                s = jnp.where(page == 0, jnp.inf, s)
            bits = jax.lax.bitcast_convert_type(s, jnp.int32)
            ordered = jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # signed order == float order
            key = jax.lax.bitcast_convert_type(ordered ^ jnp.int32(-2**31), jnp.uint32)
            return page, jnp.where(page < candidates, key, jnp.uint32(0))  # keys of floats > 0

        digit = jax.lax.broadcasted_iota(jnp.uint32, (1 << radix_bits,), 0)

        def fix_digit(carry):
            """The k-th largest key is the largest t with #(key >= t) >= k: fix t's next
            digit. Once #(key >= prefix) == k the chosen set is final (every later digit
            keeps the same k keys), so the passes stop there."""
            passes, threshold, _ = carry
            shift = jnp.uint32(32 - radix_bits) - passes.astype(jnp.uint32) * radix_bits
            trial = threshold | (digit << shift)  # non-decreasing in the digit

            def count(c, acc):
                return acc + (keys(c)[1][None, :] >= trial[:, None]).astype(jnp.int32)

            acc = jax.lax.fori_loop(0, live, count, jnp.zeros((digit.size, chunk), jnp.int32))
            at_least = jnp.sum(acc, axis=1)  # [digits] #(key >= trial), non-increasing
            chosen = jnp.sum(((at_least >= k) & (digit > 0)).astype(jnp.uint32))
            exact = jnp.sum(jnp.where(digit == chosen, at_least, 0)) == k
            return passes + 1, threshold | (chosen << shift), exact

        _, threshold, _ = jax.lax.while_loop(
            lambda carry: (carry[0] < 32 // radix_bits) & ~carry[2], fix_digit,
            (jnp.int32(0), jnp.zeros((), jnp.uint32), jnp.zeros((), jnp.bool_)))

        def tally(c, acc):
            page, key = keys(c)
            return (acc[0] + (key > threshold).astype(jnp.int32),
                    acc[1] + ((key == threshold) & (page < candidates)).astype(jnp.int32))

        zeros = jnp.zeros((chunk,), jnp.int32)
        above, tied = (jnp.sum(x) for x in jax.lax.fori_loop(0, live, tally, (zeros, zeros)))
        room = k - above  # ties taken, lowest pages first
        n_taken = above + jnp.minimum(room, tied)

        def write(c, carry):
            tied_before, taken_before = carry
            page, key = keys(c)
            tied = ((key == threshold) & (page < candidates)).astype(jnp.int32)
            take = (key > threshold) | ((tied > 0) & (tied_before + jnp.cumsum(tied) - tied < room))
            taken = take.astype(jnp.int32)
            before = taken_before + jnp.cumsum(taken) - taken
            # a permutation of the pages: taken ones first, in page order, then the rest
            slot = jnp.where(take, before, n_taken + page - before)
            plgpu.store(o_ref.at[slot], jnp.where(take, page, -1), mask=slot < width)
            return tied_before + jnp.sum(tied), taken_before + jnp.sum(taken)

        jax.lax.fori_loop(0, jnp.maximum(live, pl.cdiv(width, chunk)), write,
                          (jnp.int32(0), jnp.int32(0)))


@functools.partial(jax.jit, static_argnames=("groups", "k", "width", "page_size",
                                             "keep_sink_page", "radix_bits", "chunk",
                                             "num_warps", "interpret"))
def top_pages(scores, lengths, modes, layer, *, groups: int, k: int, width: int,
              page_size: int, keep_sink_page: bool, radix_bits: int = 2,
              chunk: int | None = None, num_warps: int = 4, interpret: bool = False):
    """scores: [B, K, >= groups, M'] (M' a power of two >= width; rows past `groups` are
    ignored); lengths: [B] int32; modes: [L, K] int32; layer: [1] int32 -> [B, K, groups,
    width] int32.
    `chunk` (a power of two; default min(M', 16384 >> radix_bits)): pages per loop step."""
    b, kh, _, m = scores.shape
    chunk = chunk or min(m, 16384 >> radix_bits)
    assert m >= width and radix_bits in RADIX_BITS and m % chunk == 0, (m, width, radix_bits)
    kernel = functools.partial(_topk_kernel, k=k, page_size=page_size,
                               keep_sink_page=keep_sink_page, radix_bits=radix_bits,
                               chunk=chunk)
    return pl.pallas_call(
        kernel,
        grid=(b, kh, groups),
        in_specs=[pl.BlockSpec((None, None, None, m), lambda i, j, g: (i, j, g, 0)),
                  whole(lengths), whole(modes), whole(layer)],
        out_specs=pl.BlockSpec((None, None, None, width), lambda i, j, g: (i, j, g, 0)),
        out_shape=jax.ShapeDtypeStruct((b, kh, groups, width), jnp.int32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="top_pages",
    )(scores, lengths, modes, layer)
