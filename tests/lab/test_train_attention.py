"""`selected_train`: LServe's decode-time page selection applied at every query of a sequence,
against a per-query numpy reference (values and gradients); `selected_mass`, the share of the
causal attention those pages keep."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lserve_jax.lab.train_attention import (TrainMetadata, attend_train, selected_mass,
                                            selected_train)
from tests.helpers import allowed_keys


def masked_attention(q, k, v, mask):
    g = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(x, g, axis=2) for x in (k, v))
    logits = jnp.einsum("bqnh,bjnh->bnqj", q, k) * q.shape[-1] ** -0.5
    probs = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
    return jnp.einsum("bnqj,bjnh->bqnh", probs, v)


def inputs(seed, t, n, kh, h=8, b=2):
    return [jax.random.normal(key, (b, t, heads, h)) for key, heads in
            zip(jax.random.split(jax.random.key(seed), 3), (n, kh, kh))]


def every(t, b=2):
    """Every query position of b rows."""
    return jnp.broadcast_to(jnp.arange(t), (b, t))


@pytest.mark.parametrize("t,page,logical,budget,n,kh", [
    (37, 4, 2, 3, 4, 2),   # ragged T, GQA 2
    (64, 8, 4, 4, 8, 2),   # GQA 4, hierarchical pages
    (45, 4, 4, 2, 4, 4),   # flat pages, MHA, one page chosen
    (20, 8, 2, 9, 2, 1),   # budget past the pages: causal attention
])
def test_selected_attention_matches_the_per_query_reference(t, page, logical, budget, n, kh):
    q, k, v = inputs(t + page, t, n, kh)
    mask = allowed_keys(np.asarray(q), np.asarray(k), page, logical, budget)
    got = selected_train(q, k, v, page, logical, budget, every(t))
    np.testing.assert_allclose(got, masked_attention(q, k, v, mask), atol=2e-5)
    assert budget > -(-t // page) or not mask[..., -1, :].all()  # the selection drops keys


def test_selected_attention_gradients_follow_the_chosen_keys():
    t, page, logical, budget = 33, 4, 2, 3
    q, k, v = inputs(3, t, 4, 2)
    w = jax.random.normal(jax.random.key(9), q.shape)
    mask = allowed_keys(np.asarray(q), np.asarray(k), page, logical, budget)
    grads = [jax.grad(lambda *x, f=f: jnp.sum(f(*x) * w), argnums=(0, 1, 2))(q, k, v) for f in
             (lambda q, k, v: masked_attention(q, k, v, mask),
              lambda q, k, v: selected_train(q, k, v, page, logical, budget, every(t)))]
    for want, got in zip(*grads):
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_selected_attention_at_chosen_queries_equals_those_rows():
    t, page, logical, budget = 37, 4, 2, 3
    q, k, v = inputs(6, t, 4, 2)
    at = jnp.asarray([[3, 20, 36, t], [t + 5, 0, 17, 30]])  # >= T pads
    got = selected_train(q, k, v, page, logical, budget, at=at)
    full = selected_train(q, k, v, page, logical, budget, every(t))
    for row in range(2):
        real = np.asarray(at[row]) < t
        np.testing.assert_allclose(got[row][real], full[row][np.asarray(at[row])[real]],
                                   atol=2e-5)


def test_train_metadata_select_restricts_the_retrieval_heads_at_select_at():
    """meta.select: the gated heads' queries at select_at attend to selected pages, the other
    queries causally; the streaming heads stream everywhere."""
    t, page, logical, budget = 40, 4, 2, 3
    q, k, v = inputs(4, t, 4, 2)
    at = jnp.asarray([[5, 22, 39, t], [12, 30, t, t]])
    meta = TrainMetadata(gates=jnp.asarray([[1.0, 0.0]]), sink=4, local=8,
                         select=(page, logical, budget), select_at=at)
    out = np.asarray(attend_train(q, k, v, 0, meta))
    selected = selected_train(q, k, v, page, logical, budget, every(t))
    causal = attend_train(q, k, v, 0, TrainMetadata())
    streaming = attend_train(q, k, v, 0, TrainMetadata(gates=jnp.zeros((1, 2)), sink=4, local=8))
    for row, picked in enumerate(([5, 22, 39], [12, 30])):
        rest = np.setdiff1d(np.arange(t), picked)
        np.testing.assert_allclose(out[row, picked, :2], selected[row, picked, :2], atol=2e-5)
        np.testing.assert_allclose(out[row, rest, :2], causal[row, rest, :2], atol=2e-5)
        np.testing.assert_allclose(out[row, :, 2:], streaming[row, :, 2:], atol=2e-5)
    assert not np.allclose(selected[0, 39, :2], causal[0, 39, :2], atol=1e-3)


@pytest.mark.parametrize("t,page,logical,budget,n,kh", [
    (37, 4, 2, 3, 4, 2),   # ragged T, GQA 2
    (64, 8, 4, 4, 8, 2),   # GQA 4, hierarchical pages
    (20, 8, 2, 9, 2, 1),   # budget past the pages: everything kept
])
def test_selected_mass_is_the_causal_attention_on_the_chosen_keys(t, page, logical, budget, n,
                                                                   kh):
    q, k, _ = inputs(t + 2 * page, t, n, kh)
    mask = allowed_keys(np.asarray(q), np.asarray(k), page, logical, budget)  # [B, N, T, T]
    causal = np.tril(np.ones((t, t), bool))
    g = n // kh
    logits = jnp.einsum("bqnh,bjnh->bnqj", q, jnp.repeat(k, g, axis=2)) * q.shape[-1] ** -0.5
    probs = np.asarray(jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1))
    want = (probs * mask).sum(-1)  # [B, N, T]
    at = jnp.asarray([[t - 1, 5, 2 * page + 1, t], [page, t + 3, t - 2, 0]])  # >= T pads
    got = np.asarray(selected_mass(q, k, page, logical, budget, at))  # [B, K, G, T']
    for row in range(2):
        real = np.asarray(at[row]) < t
        np.testing.assert_allclose(got[row].reshape(n, -1)[:, real],
                                   want[row][:, np.asarray(at[row])[real]], atol=2e-6)
    if budget > -(-t // page):
        np.testing.assert_allclose(got, 1.0, atol=1e-6)
    else:
        assert got.min() < 0.99  # the selection drops attention somewhere
