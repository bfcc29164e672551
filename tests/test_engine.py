"""The engine's contract with the method trainers (medvol.training.engine): a trainer gives its
updates as ``[(optimizer key, closure)]`` and the engine owns zero_grad, autocast, the scaler,
clipping, schedules and the ``after_update`` hook; ``requires_model`` is checked once; validation
is ``score_case`` per case then ``reduce``. A tiny trainer with two linear layers, no cache."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from test_layering import imports_of

from medvol.config import load_recipe
from medvol.errors import ConfigError
from medvol.training.distributed import DistInfo
from medvol.training.engine import Trainer
from medvol.training.sources import DataSource

TRAINING = Path(__file__).resolve().parents[1] / "medvol" / "training"
X = torch.tensor([[1.0, 2.0, -1.0, 0.5], [0.5, -1.0, 2.0, 1.0]])


class TwoUpdateTrainer(Trainer):
    """A ``model`` and a ``critic``, each a linear layer with its own SGD, updated in turn; every
    event (optimiser steps, closures, after_update) is recorded in ``events``."""

    name = "test_two_updates"
    grad_scale = 1.0  # the first closure's loss is multiplied by this (large: clipping shows)

    def make_source(self) -> DataSource:
        self.events: list[str] = []
        return DataSource(root=Path("unused-cache"), in_channels=4, num_outputs=2, batch_size=2, labelled=["a"],
                          unlabelled=[], val_cases=["a", "b"])

    def build_models(self) -> dict[str, nn.Module]:
        return {"model": nn.Linear(4, 1), "critic": nn.Linear(4, 1)}

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        opts = {k: torch.optim.SGD(m.parameters(), lr=0.1) for k, m in self.models.items()}
        for k, o in opts.items():
            o.register_step_post_hook(lambda *_, k=k: self.events.append(f"step {k}"))
        return opts

    def update_steps(self, batch: dict, step: int) -> list:
        x = batch["x"]

        def model() -> dict:
            self.events.append("closure model")
            loss = self.grad_scale * (self.models["model"](x) ** 2).mean()
            return {"loss": loss, "model_out": loss.detach()}

        def critic() -> dict:
            self.events.append("closure critic")
            with torch.no_grad():  # the model as the first update left it
                self.seen_model_weight = self.models["model"].weight.detach().clone()
            loss = ((self.models["critic"](x) - 1) ** 2).mean()
            return {"loss": loss, "critic_loss": loss}

        return [("model", model), ("critic", critic)]

    def after_update(self, step: int) -> None:
        self.events.append(f"after_update {step}")


def _trainer(cls=TwoUpdateTrainer, *sets: str) -> Trainer:
    torch.manual_seed(0)
    r = load_recipe("quickstart", ["trainer.amp=false", "trainer.grad_clip=null", "trainer.steps=10",
                                   "schedule.name=constant", *sets])
    return cls(r, "unused-cache", "unused-run", DistInfo())


def _grads(model: nn.Module, loss_fn) -> list[torch.Tensor]:
    """The gradient of ``loss_fn(model)`` for each parameter, computed apart (on a copy)."""
    import copy

    twin = copy.deepcopy(model)
    loss_fn(twin).backward()
    return [p.grad.clone() for p in twin.parameters()]


def test_two_closures_update_two_optimisers_in_order_then_after_update():
    t = _trainer()
    for step in range(2):
        t.optimization_step({"x": X}, step)
    assert t.events == ["closure model", "step model", "closure critic", "step critic", "after_update 0",
                        "closure model", "step model", "closure critic", "step critic", "after_update 1"]


def test_the_second_closure_sees_the_first_update():
    t = _trainer()
    before = t.models["model"].weight.detach().clone()
    t.optimization_step({"x": X}, 0)
    torch.testing.assert_close(t.seen_model_weight, t.models["model"].weight.detach())
    assert not torch.equal(t.seen_model_weight, before)


def test_each_update_uses_its_own_fresh_gradient():
    """SGD moves every parameter by lr x the gradient of this step's loss alone: the engine
    zeroes the gradients before each closure (nothing accumulates over steps)."""
    t = _trainer()
    t.optimization_step({"x": X}, 0)
    fns = {"model": lambda m: (m(X) ** 2).mean(), "critic": lambda m: ((m(X) - 1) ** 2).mean()}
    want = {k: _grads(t.models[k], fn) for k, fn in fns.items()}
    before = {k: [p.detach().clone() for p in t.models[k].parameters()] for k in fns}
    t.optimization_step({"x": X}, 1)
    for k in fns:
        for p, b, g in zip(t.models[k].parameters(), before[k], want[k]):
            torch.testing.assert_close(p.grad, g)
            torch.testing.assert_close(p.detach(), b - 0.1 * g)


def test_logged_values_are_every_closures_terms_and_the_first_loss():
    t = _trainer()
    losses = t.optimization_step({"x": X}, 0)
    assert list(losses) == ["loss", "model_out", "critic_loss"]
    assert losses["loss"] == losses["model_out"] and all(isinstance(v, float) for v in losses.values())


class LoudTrainer(TwoUpdateTrainer):
    grad_scale = 1e4


def test_gradients_are_clipped_to_the_recipe_limit_for_the_clipped_keys_only():
    t = _trainer(LoudTrainer, "trainer.grad_clip=0.5")
    t.optimization_step({"x": X}, 0)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in t.models["model"].parameters()]))
    assert float(norm) == pytest.approx(0.5, rel=1e-4)  # far above 0.5 unclipped (x 1e4)
    unclipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in t.models["critic"].parameters()]))
    assert float(unclipped) > 0.5  # grad_clip_keys = ("model",): the critic keeps its gradient


def test_every_schedule_steps_once_per_step():
    t = _trainer(TwoUpdateTrainer, "schedule.name=poly")
    lrs = []
    for step in range(3):
        t.optimization_step({"x": X}, step)
        lrs.append([o.param_groups[0]["lr"] for o in t.optimizers.values()])
    want = [0.1 * (1 - s / 10) ** 0.9 for s in (1, 2, 3)]
    np.testing.assert_allclose(lrs, [[w, w] for w in want])


def test_requires_model_is_checked_once_with_the_trainers_name():
    class NeedsOther(TwoUpdateTrainer):
        name = "needs_other"
        requires_model = "vnet_transformer"

    with pytest.raises(ConfigError, match=r"trainer 'needs_other' needs model.name vnet_transformer, got 'dynunet'"):
        _trainer(NeedsOther)
    _trainer(TwoUpdateTrainer)  # requires_model None: any model


def test_validate_is_score_case_per_case_then_reduce(monkeypatch):
    import medvol.training.engine as engine

    loaded = []

    def fake_load_case(cache, case, mmap=False):
        loaded.append(case)
        return np.full((1, 2, 2, 2), len(loaded), np.float32), np.zeros((1, 2, 2, 2), np.int8), {"case_id": case}

    class Scored(TwoUpdateTrainer):
        def score_case(self, case, image, label, props):
            return {"val/dice_x": float(image.max()), "val/dice_y": 2.0} if case == "a" else {"val/dice_x": 3.0}

    monkeypatch.setattr(engine, "load_case", fake_load_case)
    t = _trainer(Scored)
    assert t.validate() == {"val/dice_x": 2.0, "val/dice_y": 2.0, "val/dice_mean": 2.0}
    assert loaded == ["a", "b"]


def _calls(path: Path, attr: str) -> list[int]:
    return [n.lineno for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == attr]


def test_no_trainer_calls_backward_or_steps_an_optimiser():
    """The engine alone back-propagates, steps the optimisers and the scaler."""
    for path in sorted(TRAINING.glob("*.py")):
        if path.name == "engine.py":
            continue
        for attr in ("backward", "zero_grad", "unscale_"):
            assert not _calls(path, attr), f"{path.name} calls .{attr}() (lines {_calls(path, attr)})"
        tree = ast.parse(path.read_text())
        overrides = [n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "optimization_step"]
        assert not overrides, f"{path.name} overrides optimization_step (give update_steps / after_update)"


def test_training_imports_no_inference_stage_module_and_final_validation_not_the_engine():
    """Training validates through the shared paths (sliding_window, postprocess) and
    medvol.data.slice_outputs, never through the stage module inference.subjects; the end-of-run
    validation takes plain values, so engine -> final_validation is one-way."""
    for path in sorted(TRAINING.glob("*.py")):
        assert not [m for m in imports_of(path) if m.startswith("medvol.inference.subjects")], path.name
    assert not [m for m in imports_of(TRAINING / "final_validation.py") if m.startswith("medvol.training.engine")]
    data = TRAINING.parent / "data" / "slice_outputs.py"
    assert not [m for m in imports_of(data) if m.startswith(("medvol.training", "medvol.inference"))]
