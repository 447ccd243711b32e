"""Trains the accuracy testbed: a small GQA Llama on filler language + retrieval tasks.

The mixture comes from `lserve_jax.lab.tasks.training_sequence` (answers weighted 5x, filler
1x, unpredictable tokens 0x) and, with `TrainConfig.eval_share`, `tasks.eval_sequence` (eval
prompts followed by their answers, weighted alike). Master weights are f32; the forward runs in
the model's dtype (bf16: cuDNN flash attention on the GPU). Each step draws one sequence length
from `TrainConfig.lengths` and fills `tokens_per_step` with rows of that length, so every length
is trained at the same token rate. Batches are built by worker processes (the Python task
generator is slower than the small model's step); batch i depends only on (seed, i).
`TrainConfig.stream_pattern` trains a head split in: in a share of the steps, the pattern's
streaming heads see only sink + local keys (`train_attention.streaming_train`), so the
retrieval work moves to the other heads; with `select_share`, some of those steps also give
the other heads only the pages LServe's decode would select (`train_attention.
selected_train`). The result is an orbax checkpoint (`lserve_jax.model.checkpoint`) that
`lserve_jax.model.load_model` loads.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import multiprocessing
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from lserve_jax.config import (ModelConfig, SparsityConfig, _positive, _require,
                               page_shape)
from lserve_jax.lab import tasks
from lserve_jax.lab.train_attention import TrainAttention, TrainMetadata
from lserve_jax.model.checkpoint import load_checkpoint
from lserve_jax.model.llama import Llama, init_params
from lserve_jax.sparsity.heads import load_gates
from lserve_jax.sparsity.policy import retrieval_heads


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run (TOML file; unknown keys are errors)."""

    model: str = "testbed"  # a ModelConfig preset: the architecture (weights start random)
    out_dir: str = "lserve_jax/assets/testbed"  # checkpoint, config, loss curve
    init_from: str = ""  # a checkpoint directory to continue from (fresh optimizer); "": random
    seed: int = 0
    steps: int = 3000
    max_minutes: float = 0.0  # time budget: the schedule ends at steps or at this, first; 0: none
    tokens_per_step: int = 65536
    lengths: tuple[int, ...] = (512, 1024, 2048, 4096, 8192)
    queries: int = 8  # questions per row, about one task instance (answers repeat)
    query_every: int = 0  # > 0: the distinct layout instead, one new key per this many tokens
                          # (at most tasks.MAX_DISTINCT = 32 a row)
    distinct_share: float = 1.0  # with query_every > 0: the share of rows in the distinct
                                 # layout, the rest repeating (keeps what copying taught)
    eval_share: float = 0.0  # the share of rows shaped as eval prompts (tasks.eval_sequence: the
                             # one question at the end), before the layouts above split the rest
    eval_answer_scale: float = 1.0  # their answers' weight, x tasks.ANSWER_WEIGHT: a row holds
                                    # one question, so at 1 they carry ~0.3% of an 8K batch's loss
    eval_tasks: tuple[str, ...] = tasks.TASKS  # the eval-shaped rows' tasks, drawn uniformly:
                                               # repeat one to weight it
    eval_edge_share: float = 0.0  # of those rows, the share with the target at depth 0 or 1
    stream_pattern: str = ""  # a DuoAttention pattern directory: its heads below the
                              # stream_sparsity quantile attend to sink + local keys only in a
                              # stream_share of the steps (dense in the rest), so the model's
                              # heads split into retrieval and streaming roles as its policies
                              # assume; "": every step dense
    stream_sparsity: float = 0.5
    stream_share: float = 0.5
    stream_sink: int = 16  # the window those heads train with (the decode window of the
    stream_local: int = 64  # policy tables: decode_sink, decode_local)
    select_share: float = 0.0  # of the streaming steps, the share in which the other heads
                               # attend as in LServe's decode at the answer tokens (they stand
                               # for generated ones): each to its own page and the pages with
                               # the best Quest bounds (`selected_train`); the other queries see
                               # every key, as in LServe's prefill
    select_pages: tuple[str, ...] = ("64/16",)  # "N_P/N_L" of those steps, one drawn per step
    select_budget: int = 256  # tokens a query's pages may hold (SparsityConfig.token_budget)
    select_queries: int = 512  # answer tokens per row that select (the first ones; static)
    concentrate_weight: float = 0.0  # > 0: every step adds this x the mean -log of the share of
                                     # each retrieval head's dense attention at those answer
                                     # tokens that its concentrate_pages selection keeps
                                     # (`selected_mass`; retrieval: stream_pattern's, or all)
    concentrate_pages: str = "16/4"  # "N_P/N_L" of that selection, budget select_budget
    data_workers: int = 0  # processes building batches; 0: one per CPU core but one (max 12)
    lr: float = 2e-3
    warmup: int = 150
    weight_decay: float = 0.1
    clip: float = 1.0
    log_every: int = 25

    def __post_init__(self):
        _positive(self, "steps", "tokens_per_step", "queries", "warmup", "log_every")
        _require(0.0 <= self.distinct_share <= 1.0, "TrainConfig.distinct_share",
                 self.distinct_share, "must lie in [0, 1]")
        _require(0.0 <= self.eval_share <= 1.0, "TrainConfig.eval_share", self.eval_share,
                 "must lie in [0, 1]")
        for task in self.eval_tasks:
            _require(task in tasks.TASKS, "TrainConfig.eval_tasks", task,
                     f"is not a task; pick from {tasks.TASKS}")
        _require(bool(self.eval_tasks), "TrainConfig.eval_tasks", self.eval_tasks,
                 "needs at least one task")
        _require(0.0 <= self.eval_edge_share <= 1.0, "TrainConfig.eval_edge_share",
                 self.eval_edge_share, "must lie in [0, 1]")
        _require(self.eval_answer_scale >= 1.0, "TrainConfig.eval_answer_scale",
                 self.eval_answer_scale, "must be >= 1")
        _require(0.0 < self.stream_sparsity < 1.0, "TrainConfig.stream_sparsity",
                 self.stream_sparsity, "must lie in (0, 1)")
        _require(0.0 <= self.stream_share <= 1.0, "TrainConfig.stream_share", self.stream_share,
                 "must lie in [0, 1]")
        _positive(self, "stream_local", "select_queries")
        _require(0.0 <= self.select_share <= 1.0, "TrainConfig.select_share", self.select_share,
                 "must lie in [0, 1]")
        _require(bool(self.select_pages), "TrainConfig.select_pages", self.select_pages,
                 'needs at least one "N_P/N_L" entry')
        for entry in self.select_pages:
            select_shape(self, entry)
        _require(self.concentrate_weight >= 0.0, "TrainConfig.concentrate_weight",
                 self.concentrate_weight, "must be >= 0 (0: no concentration loss)")
        select_shape(self, self.concentrate_pages, "concentrate_pages")
        for n in self.lengths:
            _require(self.tokens_per_step % n == 0, "TrainConfig.lengths", n,
                     f"must divide tokens_per_step={self.tokens_per_step}")


def loss_fn(params, model: Llama, tokens, weights, meta: TrainMetadata = TrainMetadata(),
            retrieval=None, concentrate_weight: float = 0.0):
    """Weighted next-token cross entropy; also the share of answer tokens predicted exactly
    (answer_acc; eval_acc for the eval-shaped rows' answers when eval_answer_scale > 1).
    meta.gates (0 / 1 per head) makes the 0 heads attend to sink + local keys only. With
    meta.concentrate, adds concentrate_weight x the mean -log of the heads' `kept_mass` at
    meta.select_at over the heads that `retrieval` ([L, K], > 0: counted; None: every head)
    marks, and reports that mean mass as `kept`."""
    cast = jax.tree.map(lambda p: p.astype(model.cfg.dtype), params)
    inputs, targets, w = tokens[:, :-1], tokens[:, 1:], weights[:, 1:]
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
    (logits, _), state = model.apply({"params": cast}, inputs, positions, None, meta,
                                     mutable=["intermediates"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    right = jnp.argmax(logits, -1) == targets
    answers, scaled = w == tasks.ANSWER_WEIGHT, w > tasks.ANSWER_WEIGHT  # scaled: eval-shaped
    loss, metrics = jnp.sum(w * ce) / jnp.sum(w), {
        "answer_acc": jnp.sum(right & answers) / jnp.maximum(jnp.sum(answers), 1),
        "eval_acc": jnp.sum(right & scaled) / jnp.maximum(jnp.sum(scaled), 1),
        "filler_ce": jnp.sum(jnp.where(w == 1, ce, 0)) / jnp.maximum(jnp.sum(w == 1), 1)}
    if meta.concentrate:
        kept = jnp.stack([state["intermediates"][f"layers_{i}"]["attn"]["kept_mass"][0]
                          for i in range(model.cfg.n_layers)])  # [L, B, K, G, T']
        heads = (jnp.ones((kept.shape[0], kept.shape[2])) if retrieval is None
                 else jnp.asarray(retrieval))
        counted = ((meta.select_at < inputs.shape[1])[None, :, None, None, :]
                   & (heads > 0)[:, None, :, None, None])
        counted = jnp.broadcast_to(counted, kept.shape)
        n = jnp.maximum(jnp.sum(counted), 1)
        recall = jnp.sum(jnp.where(counted, -jnp.log(kept + 1e-6), 0.0)) / n
        loss = loss + concentrate_weight * recall
        metrics["kept"] = jnp.sum(jnp.where(counted, kept, 0.0)) / n
    return loss, metrics


def make_batch(cfg: TrainConfig, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Batch `index` of a run: (tokens, weights), [tokens_per_step / T, T + 1] each. Rows:
    eval-shaped, then distinct-layout, then repeating-layout."""
    rng = np.random.default_rng([cfg.seed, index])
    length = int(rng.choice(cfg.lengths))
    n_rows = cfg.tokens_per_step // length
    rows = [tasks.eval_sequence(rng, length + 1, cfg.eval_tasks, cfg.eval_edge_share)
            for _ in range(round(cfg.eval_share * n_rows))]
    rows = [(t, np.where(w == tasks.ANSWER_WEIGHT, w * cfg.eval_answer_scale, w).astype(w.dtype))
            for t, w in rows]
    n_rest, n_distinct = n_rows - len(rows), 0
    if cfg.query_every > 0:
        n_distinct = round(cfg.distinct_share * n_rest)
        per_row = min(max(1, length // cfg.query_every), tasks.MAX_DISTINCT)
        rows += [tasks.training_sequence(rng, length + 1, per_row, distinct=True)
                 for _ in range(n_distinct)]
    rows += [tasks.training_sequence(rng, length + 1, cfg.queries)
             for _ in range(n_rest - n_distinct)]
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


def _batches(cfg: TrainConfig):
    """Batches 0, 1, ... in order, built ahead by a pool of spawned worker processes."""
    workers = cfg.data_workers or max(1, min(12, (os.cpu_count() or 2) - 1))
    spawn = multiprocessing.get_context("spawn")  # never fork a process that runs JAX
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=spawn)
    try:
        ahead = collections.deque(pool.submit(make_batch, cfg, i)
                                  for i in range(min(cfg.steps, 2 * workers)))
        for i in range(2 * workers, cfg.steps + 2 * workers):
            yield ahead.popleft().result()
            if i < cfg.steps:
                ahead.append(pool.submit(make_batch, cfg, i))
    finally:
        pool.shutdown(cancel_futures=True)


def stream_gates(cfg: TrainConfig, model_cfg: ModelConfig) -> np.ndarray | None:
    """[L, K] f32, 1 for a retrieval head and 0 for a head that streams in streaming steps
    (policy.retrieval_heads of cfg.stream_pattern at cfg.stream_sparsity); None without one."""
    if not cfg.stream_pattern:
        return None
    gates = load_gates(cfg.stream_pattern)
    want = (model_cfg.n_layers, model_cfg.n_kv_heads)
    _require(gates.shape == want, "TrainConfig.stream_pattern", cfg.stream_pattern,
             f"has gates of shape {gates.shape}, but model {cfg.model!r} has {want}: use a "
             "pattern of this model")
    return retrieval_heads(gates, cfg.stream_sparsity).astype(np.float32)


def streams(cfg: TrainConfig, index: int) -> bool:
    """Whether step `index` restricts the streaming heads (depends only on (seed, index))."""
    return bool(cfg.stream_pattern) and bool(
        np.random.default_rng([cfg.seed, index, 1]).random() < cfg.stream_share)


def select_shape(cfg: TrainConfig, entry: str,
                 field: str = "select_pages") -> tuple[int, int, int]:
    """(page_size, logical_page_size, budget_pages) of one "N_P/N_L" entry (of `select_pages`
    or `field`), as the decode of a SparsityConfig with those pages and
    token_budget=select_budget selects."""
    try:
        sparsity = SparsityConfig(**page_shape(entry), token_budget=cfg.select_budget)
    except ValueError as err:
        raise ValueError(f"TrainConfig.{field}: {entry!r} with select_budget="
                         f"{cfg.select_budget} is not a valid page shape ({err})") from None
    return sparsity.page_size, sparsity.logical_page_size, sparsity.budget_pages


def answer_queries(weights: jax.Array, m: int) -> jax.Array:
    """[B, m] int32: the first m input positions of each row whose target is an answer token
    (weights [B, T + 1] as `make_batch` gives them), padded with T."""
    targets = weights[:, 1:] >= tasks.ANSWER_WEIGHT
    return jax.vmap(lambda row: jnp.nonzero(row, size=m, fill_value=row.shape[0])[0])(
        targets).astype(jnp.int32)


def selects(cfg: TrainConfig, index: int) -> str | None:
    """The `select_pages` entry step `index` trains with, or None (dense or streaming only);
    only streaming steps select, and the choice depends only on (seed, index)."""
    rng = np.random.default_rng([cfg.seed, index, 2])
    if not streams(cfg, index) or rng.random() >= cfg.select_share:
        return None
    return cfg.select_pages[int(rng.integers(len(cfg.select_pages)))]


def train(cfg: TrainConfig) -> tuple[dict, list[dict]]:
    """Returns (f32 params, history rows). Progress bar shows loss and answer accuracy."""
    model_cfg = ModelConfig.from_name(cfg.model)
    if cfg.init_from:
        params = jax.tree.map(lambda p: p.astype(jnp.float32), load_checkpoint(cfg.init_from)[1])
    else:
        params = jax.jit(init_params, static_argnums=0)(
            dataclasses.replace(model_cfg, dtype="float32"), jax.random.key(cfg.seed))
    # computes in the preset's dtype from the f32 master weights
    model = Llama(model_cfg, TrainAttention())
    gates = {False: None, True: stream_gates(cfg, model_cfg)}  # None: the causal path alone
    retrieval = gates[True]  # the heads the concentration loss counts (None: all)
    concentrate = (select_shape(cfg, cfg.concentrate_pages, "concentrate_pages")
                   if cfg.concentrate_weight else None)
    opt = optax.chain(optax.clip_by_global_norm(cfg.clip), optax.inject_hyperparams(
        optax.adamw)(learning_rate=0.0, b2=0.95, weight_decay=cfg.weight_decay))
    state = opt.init(params)

    @functools.partial(jax.jit, static_argnames="select")
    def step(params, state, tokens, weights, lr, gates, select=None):
        state[1].hyperparams["learning_rate"] = lr  # inject_hyperparams: the schedule is host-side
        at = answer_queries(weights, cfg.select_queries) if select or concentrate else None
        meta = TrainMetadata(gates=gates, sink=cfg.stream_sink, local=cfg.stream_local,
                             select=select, select_at=at, concentrate=concentrate)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, model, tokens, weights, meta, retrieval, cfg.concentrate_weight)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, {"loss": loss, **aux}

    history, start, progress = [], time.perf_counter(), 0.0
    bar = tqdm(total=cfg.steps, desc="train", unit="step")
    batches = _batches(cfg)
    for i, (tokens, weights) in zip(range(cfg.steps), batches):
        lr = jnp.float32(_learning_rate(cfg, i, progress))
        streamed, pages = streams(cfg, i), selects(cfg, i)
        params, state, metrics = step(params, state, tokens, weights, lr, gates[streamed],
                                      select=pages and select_shape(cfg, pages))
        elapsed = time.perf_counter() - start
        progress = max(i / cfg.steps, elapsed / (60 * cfg.max_minutes) if cfg.max_minutes else 0)
        bar.update()
        if i % cfg.log_every == 0 or progress >= 1 or i == cfg.steps - 1:
            row = {"step": i, "length": tokens.shape[1] - 1, "streamed": streamed,
                   "selected": pages,
                   "seconds": round(elapsed, 1),
                   "lr": float(lr), **{k: round(float(v), 4) for k, v in metrics.items()}}
            history.append(row)
            bar.set_postfix(loss=row["loss"], answer_acc=row["answer_acc"],
                            eval_acc=row["eval_acc"], T=row["length"])
        if progress >= 1:
            break
    bar.close()
    batches.close()  # cancels the batches built ahead and shuts the pool down
    return params, history


def _learning_rate(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up, then cosine decay to lr / 20 over the run's progress in [0, 1] (steps
    done or time spent, whichever is further along)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * min(progress, 1.0))))
