"""The `recall` task: how much of a retrieval head's dense attention the keys LServe's decode
attends to keep (selection recall), against the best choice of as many pages.

Each prompt of the grid (the `accuracy` task's prompts) is teacher-forced with its answer through
the dense model. A decode step i (query at position P + i, P = prompt length) uses the selection
made at step i - i % R: the query at that step scores the pages held then (`page_select`'s
reference on the logical-page min / max of the keys up to it) and chooses with the policy's
budget, anchor and adaptive budget; step i attends to the pages the decode op's reference lists
for it (`sparse_decode.reference.decode_page_lists`), keys up to itself. Per query head of every
SELECT head: `kept`, the share of the query's dense attention on those keys; `oracle`, the most
that as many pages (the current one and the heaviest earlier ones) could keep; `pages`, pages
attended; `missed`, the share of (step, query head) pairs that keep under half (a mean near 1
can hide the single steps that derail an answer). A selector near the oracle with both low
means the attention is spread: no choice of pages reproduces it; kept well under the oracle
means the selection (or its reuse) misses.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lserve_jax.attention import split_heads
from lserve_jax.config import ModelConfig, SparsityConfig
from lserve_jax.lab.ablation import NO_SWEEP, cell_samples, check_vocabulary, text_samples, variants
from lserve_jax.lab.experiment import ExperimentConfig
from lserve_jax.lab.plots import plot_recall
from lserve_jax.lab.report import markdown_table, provenance
from lserve_jax.lab.train_attention import TrainAttention, TrainMetadata, attend_train, page_stats
from lserve_jax.model import LoadedModel, load_model
from lserve_jax.model.llama import Llama
from lserve_jax.sparsity.heads import policy_gates
from lserve_jax.sparsity.pages import group_reduce, select_kwargs
from lserve_jax.sparsity.policy import SELECT, head_modes
from pallas_kernels.page_select.reference import page_scores_reference, select_pages_reference
from pallas_kernels.sparse_decode.reference import decode_page_lists

MEASURES = ("kept", "oracle", "pages")
MISSED_BELOW = 0.5  # a step keeping less than this share of its attention counts as missed
PAD_TO = 256  # teacher-forced sequences are padded to a multiple of this: one compile per context
STEPS_TO = 16  # and the steps measured at once, for one compile per (sparsity, context)


@dataclasses.dataclass(frozen=True)
class _RecordingAttention(TrainAttention):
    """Dense causal attention that sows each layer's post-RoPE q [B, T, N, H], k [B, T, K, H]."""

    def attend(self, module, qkv, rope, cache, meta, layer: int):
        q, k, v = split_heads(qkv, rope, module.cfg.n_kv_heads)
        module.sow("intermediates", "qk", (q, k))
        return attend_train(q, k, v, layer, meta), cache


@functools.partial(jax.jit, static_argnums=0)
def teacher_forced_qk(cfg: ModelConfig, params, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(q [L, T, N, H], k [L, T, K, H]) f32 of the dense forward over tokens [T]."""
    positions = jnp.arange(tokens.shape[0])[None]
    _, state = Llama(cfg, _RecordingAttention()).apply(
        {"params": params}, tokens[None], positions, None, TrainMetadata(),
        mutable="intermediates")
    qk = [state["intermediates"][f"layers_{layer}"]["attn"]["qk"][0]
          for layer in range(cfg.n_layers)]
    return tuple(jnp.stack([x[i][0] for x in qk]).astype(jnp.float32) for i in (0, 1))


def recall(q: jax.Array, k: jax.Array, prompt_len: int, n_steps: int, sparsity: SparsityConfig,
           modes: np.ndarray) -> dict[str, np.ndarray]:
    """{kept, oracle, pages}: [L, n_steps, K, G] each, for the first n_steps decode steps after
    a prompt of prompt_len tokens, given the teacher-forced q [L, T, N, H] and k [L, T, K, H]
    (T > prompt_len + n_steps - 1) and the [L, K] head modes (non-SELECT heads: meaningless)."""
    steps = np.arange(-(-n_steps // STEPS_TO) * STEPS_TO).clip(max=n_steps - 1)  # last repeats
    at = prompt_len + steps  # each step's query
    by = prompt_len + steps - steps % sparsity.reuse_interval  # the query that selected for it
    n_kv = k.shape[2]
    groups = q.reshape(*q.shape[:2], n_kv, -1, q.shape[-1])  # [L, T, K, G, H]
    out = _recall(sparsity, groups[:, at], groups[:, by], k, jnp.asarray(at), jnp.asarray(by),
                  jnp.asarray(modes))
    return {name: np.asarray(x)[:, :n_steps] for name, x in zip(MEASURES, out)}


@functools.partial(jax.jit, static_argnums=0)
def _recall(sparsity: SparsityConfig, q_at, q_by, k, at, by, modes):
    """`recall`'s measures, every layer at once (q_at, q_by: [L, Q, K, G, H]; k: [L, T, K, H];
    modes: [L, K])."""
    n_p = sparsity.page_size
    k = jnp.pad(k, ((0, 0), (0, -k.shape[1] % n_p), (0, 0), (0, 0)))
    layer = functools.partial(_layer_recall, sparsity, at=at, by=by)
    return jax.vmap(layer)(q_at, q_by, k, modes)


def _layer_recall(sparsity: SparsityConfig, q_at, q_by, k, modes, *, at, by):
    """One layer. q_at, q_by: [Q, K, G, H] the queries of the steps and of the steps that
    selected for them, at positions at, by [Q]; k: [Tp, K, H] (whole pages); modes: [K]."""
    n_p, n_l = sparsity.page_size, sparsity.logical_page_size
    n_q, n_kv, g, h = q_at.shape
    m = k.shape[0] // n_p
    pos = jnp.arange(k.shape[0])
    # the cache when selecting holds the keys up to `by`; repeating the last one past it gives
    # every logical page reached the cache's min / max, and one not reached scores that key's
    # q.k, no more than the page holding it: the current page's max is the cache's
    held = jnp.where((pos <= by[:, None])[..., None, None], k, k[by][:, None])  # [Q, Tp, K, H]

    def pool(stat):  # [Q, Tp/N_L, K, H] -> [Q * K * M, N_P/N_L, H]: each row's own pages
        return stat.reshape(n_q, m, n_p // n_l, n_kv, h).transpose(0, 3, 1, 2, 4).reshape(
            -1, n_p // n_l, h)

    kmin, kmax = (pool(stat) for stat in page_stats(held, n_l))
    table = jnp.arange(n_q * n_kv * m, dtype=jnp.int32).reshape(n_q, 1, n_kv, m)
    scores = page_scores_reference(q_by, kmin, kmax, table, by + 1, modes[None], layer=0,
                                   page_size=n_p, group_reduce=group_reduce(sparsity))
    selected = select_pages_reference(scores, by + 1, modes, width=sparsity.selection_width,
                                      page_size=n_p, **select_kwargs(sparsity, h, g))
    pages, counts = decode_page_lists(selected, at + 1, modes, width=m, page_size=n_p,
                                      local=sparsity.decode_local,
                                      sink_pages=sparsity.sink_pages,
                                      budget_pages=sparsity.budget_pages)
    page = jnp.arange(m)
    used = (page < counts[..., None])[..., None]  # [Q, K, Gs, width, 1]
    listed = jnp.any((pages[..., None] == page) & used, axis=-2)  # [Q, K, Gs, M]
    logits = jnp.einsum("qkgh,jkh->qkgj", q_at, k, precision="highest") * h ** -0.5
    probs = jax.nn.softmax(jnp.where(pos <= at[:, None, None, None], logits, -jnp.inf), axis=-1)
    mass = probs.reshape(n_q, n_kv, g, m, n_p).sum(-1)  # [Q, K, G, M]
    kept = jnp.sum(jnp.where(listed, mass, 0.0), axis=-1)  # Gs broadcasts over G
    counts = jnp.broadcast_to(counts, (n_q, n_kv, g))
    current = (at // n_p)[:, None, None, None]
    earlier = jnp.where(page < current, mass, 0.0)
    best = jnp.cumsum(-jnp.sort(-earlier, axis=-1), axis=-1)  # [.., j]: the j + 1 heaviest
    others = jnp.take_along_axis(best, jnp.maximum(counts - 2, 0)[..., None], axis=-1)[..., 0]
    oracle = (jnp.sum(jnp.where(page == current, mass, 0.0), axis=-1)
              + jnp.where(counts > 1, others, 0.0))
    return kept, oracle, counts.astype(jnp.float32)


def grid_prompts(exp: ExperimentConfig, model: LoadedModel,
                 context: int) -> list[tuple[np.ndarray, int]]:
    """(prompt + answer tokens, prompt length) of every (task, depth, sample) of a context: the
    prompts the `accuracy` task scores (text prompts for a model with a tokenizer)."""
    check_vocabulary(exp, model)
    out = []
    for task in exp.tasks:
        for at in range(len(exp.depths)):
            if model.tokenizer is None:
                out += [(np.concatenate([s.prompt, s.answer]), len(s.prompt))
                        for s in cell_samples(task, context, at, exp)]
            else:
                out += [(np.array(ids + answer_ids, np.int32), len(ids)) for ids, _, answer_ids
                        in text_samples(task, context, at, exp, model.tokenizer)]
    return out


def run_recall(exp: ExperimentConfig) -> list[dict]:
    """One row per (selecting policy, sweep value, layer, SELECT KV head): kept, oracle and
    pages (mean over the decode steps of every prompt and over the head's query heads), kept
    per context as `kept@CONTEXT`, and each per query head. Policies that select no pages are
    skipped with a note."""
    model = load_model(exp.model, exp.run.seed, exp.weight_dtype)
    cfg = model.config
    skipped = [p for p in exp.policies if not exp.sparsity.for_policy(p).dynamic]
    if skipped:
        print(f"recall: skipping {skipped}: they select no pages")
    cells = {}  # (policy, label) -> (sparsity, gates, modes)
    for label, base in variants(exp):
        for policy in exp.policies:
            sparsity = base.for_policy(policy)
            if sparsity.dynamic:
                gates = policy_gates(sparsity, cfg, model.pattern)
                cells[(policy, label)] = sparsity, gates, head_modes(cfg, sparsity, gates)
    prompts = {c: grid_prompts(exp, model, c) for c in exp.contexts}  # a bad context fails now
    measured = {key: {c: [] for c in exp.contexts} for key in cells}  # recall() per prompt
    bar = tqdm(total=sum(map(len, prompts.values())), desc="recall", unit="prompt")
    for context, group in prompts.items():
        for tokens, prompt_len in group:
            padded = np.zeros(-(-len(tokens) // PAD_TO) * PAD_TO, np.int32)
            padded[:len(tokens)] = tokens
            q, k = teacher_forced_qk(cfg, model.params, jnp.asarray(padded))
            n_steps = len(tokens) - prompt_len - 1  # the decode steps that emit answer tokens
            for key, (sparsity, _, modes) in cells.items():
                measured[key][context].append(recall(q, k, prompt_len, n_steps, sparsity, modes))
            bar.update()
    bar.close()
    rows = []
    for (policy, label), (sparsity, gates, modes) in cells.items():
        per_context = {c: {m: np.concatenate([r[m] for r in runs], axis=1)
                           for m in MEASURES} for c, runs in measured[(policy, label)].items()}
        every = {m: np.concatenate([r[m] for r in per_context.values()], axis=1)
                 for m in MEASURES}  # [L, steps, K, G]
        for layer, kv_head in zip(*np.nonzero(modes == SELECT)):
            row = {"policy": policy, "variant": label, "layer": int(layer),
                   "kv_head": int(kv_head),
                   "gate": None if gates is None else round(float(gates[layer, kv_head]), 3)}
            for m in MEASURES:
                per_q = every[m][layer, :, kv_head].mean(0)  # [G]
                row[m] = round(float(per_q.mean()), 4)
                row[f"{m}_per_query_head"] = np.round(per_q, 4).tolist()
            row["missed"] = round(float((every["kept"][layer, :, kv_head] < MISSED_BELOW).mean()),
                                  4)
            for c, got in per_context.items():
                row[f"kept@{c}"] = round(float(got["kept"][layer, :, kv_head].mean()), 4)
            row["steps"] = every["kept"].shape[1]
            rows.append(row)
    if not rows:
        raise ValueError(f"no head selects pages under ExperimentConfig.policies="
                         f"{list(exp.policies)}: every one streams or runs dense (lower "
                         "SparsityConfig.static_sparsity or dense_layers)")
    return rows


def summary(exp: ExperimentConfig, rows: list[dict]) -> list[dict]:
    """Per (policy, sweep value): the mean over its SELECT heads of every measure."""
    head = ["policy", exp.sweep] if exp.sweep else ["policy"]
    keys = [*MEASURES, "missed", *(f"kept@{c}" for c in exp.contexts)]
    out = []
    for cell in dict.fromkeys((r["policy"], r["variant"]) for r in rows):
        mine = [r for r in rows if (r["policy"], r["variant"]) == cell]
        out.append({**dict(zip(head, cell)), "heads": len(mine),
                    **{k: round(float(np.mean([r[k] for r in mine])), 4) for k in keys}})
    return out


def write_recall(exp: ExperimentConfig, rows: list[dict],
                 out_dir: str | pathlib.Path) -> list[pathlib.Path]:
    """Writes `<name>.json` (provenance, config, summary, rows), `<name>.md` (summary and
    per-head tables) and `<name>.png` (kept vs oracle per head, a panel per variant); prints
    the summary; returns the paths (JSON first)."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{exp.name}.{ext}" for ext in ("json", "md", "png")]
    means = summary(exp, rows)
    paths[0].write_text(json.dumps({**provenance(), "config": dataclasses.asdict(exp),
                                    "summary": means, "rows": rows}, indent=1, default=str)
                        + "\n")
    label = [exp.sweep] if exp.sweep else []
    columns = ["policy", *label, "layer", "kv_head", "gate", *MEASURES, "missed",
               *(f"kept@{c}" for c in exp.contexts)]
    per_head = markdown_table([{**r, **dict(zip(label, [r["variant"]]))} for r in rows], columns)
    table = markdown_table(means, list(means[0]))
    paths[1].write_text(
        f"# {exp.name}\n\nSelection recall at the decode steps that emit the answer "
        f"({exp.samples} prompts per task x depth of tasks {list(exp.tasks)}, depths "
        f"{list(exp.depths)}, teacher-forced through the dense model): `kept` is the share of a "
        "retrieval head's dense attention on the keys its decode attends to (reuse included), "
        "`oracle` the most that as many pages could keep, `pages` the pages attended per step, "
        f"`missed` the share of steps keeping under {MISSED_BELOW}; mean over query heads and "
        f"steps (`kept@N`: at context N).\n\n{table}\n\n"
        f"## Per retrieval head\n\n{per_head}\n")
    titles = {(r["policy"], r["variant"]): r["policy"] + (
        f", {exp.sweep}={r['variant']}" if r["variant"] != NO_SWEEP else "") for r in rows}
    plot_recall(rows, titles, paths[2],
                f"{exp.name}: dense attention kept at the answer steps, contexts "
                f"{list(exp.contexts)}")
    print(table)
    return paths
