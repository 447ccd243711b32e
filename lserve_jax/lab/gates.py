"""DuoAttention head identification with optax: which (layer, KV head) pairs need full
attention, and which can stream (sink + local window).

Each (layer, KV head) gets a gate in [0, 1]; its attention output is gate * full attention +
(1 - gate) * streaming attention (`attention.attend_train`). With the model frozen, the gates
minimise the distillation loss, the mean squared error between the dense model's final hidden
states (after the last norm) and the gated model's, on the answer positions of retrieval
samples, plus `l1` times the mean |gate|, which pushes every gate that the answers do not need
towards 0. AdamW with warm-up and cosine decay; gates are clipped to [0, 1] after each step.
The samples come from a `Source`: the testbed's retrieval tasks by default, needle prompts
(`lab.needles`) for a model with a text tokenizer. The result is written as DuoAttention's
pattern files (`sparsity.heads.save_pattern`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from lserve_jax.config import ModelConfig, _positive, _require
from lserve_jax.lab import tasks
from lserve_jax.lab.train_attention import TrainAttention, TrainMetadata
from lserve_jax.model.llama import Llama


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """Gate training, DuoAttention's recipe scaled to the testbed."""

    steps: int = 300
    length: int = 4096  # training sequence length (tokens)
    batch: int = 4
    sink: int = 16  # the streaming branch's window, as the policy's prefill_sink / prefill_local
    local: int = 256
    lr: float = 0.02
    warmup: int = 30
    l1: float = 0.05  # weight of mean |gate|
    seed: int = 0
    remat: bool = False  # recompute each layer's attention in the backward pass: less memory

    def __post_init__(self):
        _positive(self, "steps", "length", "batch", "local", "warmup")
        _require(self.warmup < self.steps, "GateConfig.warmup", self.warmup,
                 f"must be below steps={self.steps} (the learning rate warms up, then decays)")


# (rng, length) -> (tokens [length] int32, answer mask [length] bool: the answer tokens)
Source = Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]


def testbed_sequence(rng: np.random.Generator, length: int) -> tuple[np.ndarray, np.ndarray]:
    """A testbed training row (`tasks.training_sequence`) with its answer tokens marked."""
    tokens, weights = tasks.training_sequence(rng, length)
    return tokens, weights == tasks.ANSWER_WEIGHT


def gate_step(model_cfg: ModelConfig, cfg: GateConfig
              ) -> tuple[Callable, optax.GradientTransformation]:
    """(step, optimizer): the jitted training step(params, gates [L, K] f32, optimizer state,
    tokens [B, T] int32, answers [B, T] bool marking the answer tokens) -> (gates, optimizer
    state, loss, distill), and the optimizer its state comes from (`opt.init(gates)`)."""
    model = Llama(model_cfg, TrainAttention(remat=cfg.remat))
    meta = TrainMetadata(sink=cfg.sink, local=cfg.local)

    def hidden(params, tokens, gates):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        _, state = model.apply({"params": params}, tokens, positions, None,
                               dataclasses.replace(meta, gates=gates), mutable=["intermediates"])
        return state["intermediates"]["hidden"][0].astype(jnp.float32)

    def loss_fn(gates, params, tokens, answers):
        # a hidden state at position i predicts token i + 1: score the states before answers
        before = jnp.pad(answers[:, 1:], ((0, 0), (0, 1)))
        teacher = jax.lax.stop_gradient(hidden(params, tokens, None))
        err = jnp.mean((hidden(params, tokens, gates) - teacher) ** 2, axis=-1)  # [B, T]
        distill = jnp.sum(err * before) / jnp.maximum(jnp.sum(before), 1)
        return distill + cfg.l1 * jnp.mean(jnp.abs(gates)), distill

    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup, cfg.steps,
                                                  cfg.lr / 20)
    opt = optax.adamw(schedule, weight_decay=0.0)

    @jax.jit
    def step(params, gates, state, tokens, answers):
        (loss, distill), grad = jax.value_and_grad(loss_fn, has_aux=True)(
            gates, params, tokens, answers)
        updates, state = opt.update(grad, state, gates)
        gates = jnp.clip(optax.apply_updates(gates, updates), 0.0, 1.0)
        return gates, state, loss, distill

    return step, opt


def train_gates(model_cfg: ModelConfig, params, cfg: GateConfig = GateConfig(),
                source: Source = testbed_sequence) -> tuple[np.ndarray, list[dict]]:
    """Returns (gates [L, K] float32 in [0, 1], history rows); each step trains on
    `cfg.batch` rows of `source`."""
    step, opt = gate_step(model_cfg, cfg)
    gates = jnp.ones((model_cfg.n_layers, model_cfg.n_kv_heads), jnp.float32)
    state = opt.init(gates)
    rng = np.random.default_rng(cfg.seed)
    history = []
    for i in tqdm(range(cfg.steps), desc="gates", unit="step"):
        rows = [source(rng, cfg.length) for _ in range(cfg.batch)]
        tokens = jnp.asarray(np.stack([r[0] for r in rows]))
        answers = jnp.asarray(np.stack([r[1] for r in rows]))
        gates, state, loss, distill = step(params, gates, state, tokens, answers)
        if i % 10 == 0 or i == cfg.steps - 1:
            history.append({"step": i, "loss": float(loss), "distill": float(distill),
                            "mean_gate": float(gates.mean())})
    return np.asarray(gates), history
