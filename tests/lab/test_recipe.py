"""The testbed recipe: the committed file parses into a chain of steps, a toy recipe runs end
to end on the CPU and installs a model that loads with its pattern, and bad files are named."""

import pathlib

import numpy as np
import pytest

from lserve_jax.lab.recipe import load_recipe, run_recipe
from lserve_jax.model import load_model
from lserve_jax.sparsity.heads import load_pattern

RECIPE = pathlib.Path(__file__).parents[2] / "experiments" / "configs" / "testbed_recipe.toml"

TOY = """
checkpoint = "{root}/installed"
work_dir = "{root}/work"

[train]
model = "tiny"
tokens_per_step = 512
lengths = [256]
warmup = 1
log_every = 1

[[step]]
name = "first"
steps = 2
lr = 3e-3

[[step]]
name = "split"
gates = {{ steps = 2, length = 256, batch = 1, local = 16, warmup = 1 }}

[[step]]
name = "second"
steps = 2
lr = 1e-3
stream_pattern = "split"
stream_share = 1.0
stream_local = 16

[[step]]
name = "final_gates"
gates = {{ steps = 2, length = 256, batch = 1, local = 16, warmup = 1 }}
"""


def test_committed_recipe_chains_its_steps():
    recipe = load_recipe(RECIPE)
    train = [s for s in recipe.steps if s.train]
    assert train[0].train.init_from == ""  # from random weights
    for before, after in zip(train, train[1:]):
        assert after.train.init_from == before.train.out_dir
    assert recipe.checkpoint == "lserve_jax/assets/testbed"
    assert recipe.steps[-1].gates is not None  # the installed pattern is the final model's
    patterns = {str(recipe.output(s.name)) for s in recipe.steps if s.gates}
    assert {s.train.stream_pattern for s in train if s.train.stream_pattern} <= patterns
    assert len({s.name for s in recipe.steps}) == len(recipe.steps)


def test_toy_recipe_runs_and_installs_a_loadable_testbed(tmp_path):
    path = tmp_path / "toy.toml"
    path.write_text(TOY.format(root=tmp_path))
    recipe = load_recipe(path)
    run_recipe(recipe, tmp_path / "results")
    for name in ("train_first", "train_second", "split", "final_gates"):
        assert (tmp_path / "results" / f"{name}.json").exists()
        assert (tmp_path / "results" / f"{name}.png").exists()
    model = load_model(str(tmp_path / "installed"))
    assert model.pattern == tmp_path / "installed" / "pattern"
    gates = load_pattern(model.pattern).gates
    np.testing.assert_array_equal(gates, load_pattern(tmp_path / "work" / "final_gates").gates)
    # a part of the recipe installs nothing; resuming reuses the earlier steps' outputs
    (tmp_path / "installed" / "model.json").unlink()
    run_recipe(recipe, tmp_path / "part", start="split", stop="split")
    assert not (tmp_path / "installed" / "model.json").exists()
    run_recipe(recipe, tmp_path / "again", start="final_gates")
    assert (tmp_path / "installed" / "model.json").exists()
    again = sorted(p.name for p in (tmp_path / "again").iterdir())
    assert again == ["final_gates.json", "final_gates.png"]


@pytest.mark.parametrize("change, match", [
    (("stream_pattern = \"split\"", "stream_pattern = \"nowhere\""), "earlier gates step"),
    (("name = \"second\"", "name = \"first\""), "unique `name`"),
    (("lr = 1e-3", "lr = 1e-3\nbogus = 1"), "bogus"),
    (("gates = {{ steps = 2,", "gates = {{ steps = 0,"), "GateConfig.steps"),
])
def test_bad_recipes_name_the_step_and_field(tmp_path, change, match):
    text = TOY.replace(*change, 1).format(root=tmp_path)
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_recipe(path)
    with pytest.raises(ValueError, match="names no step"):
        run_recipe(load_recipe(RECIPE), tmp_path, start="nowhere")
