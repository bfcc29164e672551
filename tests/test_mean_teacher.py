"""The mean-teacher trainer base on a tiny 3D segmentation task (it is not tied to 2D or to
DC-MT): the teacher's EMA, no gradient to it, views, prediction by the teacher, exact resume."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medvol.config import load_recipe
from medvol.training.distributed import DistInfo
from medvol.training.engine import fit
from medvol.training.mean_teacher import MeanTeacherTrainer, teacher_decay

from conftest import sphere_case, write_v2_dataset


class ConsistencySegTrainer(MeanTeacherTrainer):
    """CE on the labelled samples (labels carried into the student's view) + MSE between the
    student's and the teacher's softmax, the teacher's carried into the student's frame."""

    name = "test_mean_teacher_seg"

    def training_step(self, batch, step):
        student_view, teacher_view = self.views(batch["image"], step)
        out_s = self.models["model"](student_view.image)
        out_t = self.teacher_forward(teacher_view.image)
        lab = self.labelled_mask(batch)
        target = student_view.from_frame(batch["label"].float(), mode="nearest", fill=-1).long()[:, 0]
        ce = F.cross_entropy(out_s[lab], target[lab], ignore_index=-1)
        cons = F.mse_loss(out_s.softmax(1), student_view.from_frame(out_t.softmax(1), teacher_view))
        return {"loss": ce + cons, "ce": ce, "consistency": cons}


@pytest.fixture(scope="module")
def sphere_pre(tmp_path_factory):
    from medvol.preprocessing import preprocess_dataset

    tmp = tmp_path_factory.mktemp("mt")
    cases = {f"s{i}": ([sphere_case(shape=(20, 20, 16), radius=5, seed=i)[0]],
                       sphere_case(shape=(20, 20, 16), radius=5, seed=i)[1], torch.eye(4).numpy()) for i in range(3)}
    root = write_v2_dataset(tmp / "Dataset005_MT", cases)
    preprocess_dataset(root, tmp / "pre", num_workers=1, quiet=True)
    return tmp / "pre"


def _recipe(**method):
    sets = ["model.base_features=4", "model.max_features=8", "model.deep_supervision=false",
            "data.patch_size=[16, 16, 16]", "data.batch_size=2", "data.num_workers=0", "data.val_cases=[s2]",
            "data.labelled=1", "data.unlabelled_per_batch=1", "data.augment.enabled=false", "trainer.amp=false",
            "trainer.steps=6", "trainer.val_every=3", "optimizer.name=adam", "optimizer.lr=0.001"]
    r = load_recipe("quickstart", sets)
    r.method = dict(method)
    return r


def _trainer(pre, run, **method):
    torch.set_num_threads(1)
    return ConsistencySegTrainer(_recipe(**method), pre, run, DistInfo())


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(2, 1, 16, 16, 16, generator=g),
            "label": (torch.rand(2, 1, 16, 16, 16, generator=g) > 0.7).long(),
            "labelled": torch.tensor([True, False])}


def test_teacher_decay_formula():
    assert teacher_decay(0, 0.99) == 0.0  # the first update makes the teacher the student
    assert teacher_decay(4, 0.99) == pytest.approx(0.8)
    assert teacher_decay(99, 0.99) == pytest.approx(0.99) and teacher_decay(10_000, 0.99) == 0.99


@pytest.mark.parametrize("step", [0, 4, 300])
def test_teacher_gets_no_gradient_and_follows_the_ema_exactly(sphere_pre, tmp_path, step):
    t = _trainer(sphere_pre, tmp_path / "run")
    teacher, student = t.models["teacher"], t.models["model"]
    with torch.no_grad():  # a teacher that differs from the student, so the average is visible
        for p in teacher.parameters():
            p.add_(0.1)
    before = {k: v.clone() for k, v in teacher.named_parameters()}
    assert not any(p.requires_grad for p in teacher.parameters())
    opt_params = {id(p) for g in t.optimizers["model"].param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in student.parameters()} and list(t.optimizers) == ["model"]
    for m in t.models.values():
        m.train()
    losses = t.optimization_step(_batch(), step)
    assert losses["consistency"] > 0
    d = teacher_decay(step, 0.99)
    for k, p in student.named_parameters():
        assert dict(teacher.named_parameters())[k].grad is None
        torch.testing.assert_close(dict(teacher.named_parameters())[k], d * before[k] + (1 - d) * p.detach(),
                                   rtol=0, atol=1e-6)


class BatchNormSegTrainer(ConsistencySegTrainer):
    """The same with a tiny student that has BatchNorm (the U-Net uses instance norm)."""

    def build_student(self):
        return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.BatchNorm3d(4), torch.nn.ReLU(),
                                   torch.nn.Conv3d(4, 2, 1))


@pytest.mark.parametrize("ema_buffers", [False, True])
def test_teacher_batchnorm_statistics_own_or_copied(sphere_pre, tmp_path, ema_buffers):
    torch.set_num_threads(1)
    t = BatchNormSegTrainer(_recipe(ema_buffers=ema_buffers), sphere_pre, tmp_path / "run", DistInfo())
    for m in t.models.values():
        m.train()
    t.optimization_step(_batch(), 3)
    own = dict(t.models["teacher"].named_buffers())
    same = [torch.equal(own[k], b) for k, b in t.models["model"].named_buffers() if "running" in k]
    assert len(same) == 2 and all(same) == ema_buffers and any(same) == ema_buffers


def test_teacher_forward_is_train_mode_by_default_and_restores_the_mode(sphere_pre, tmp_path):
    t = _trainer(sphere_pre, tmp_path / "run")
    t.models["teacher"].eval()
    seen = []
    hook = t.models["teacher"].register_forward_pre_hook(lambda m, a: seen.append(m.training))
    t.teacher_forward(torch.randn(1, 1, 16, 16, 16))
    hook.remove()
    assert seen == [True] and not t.models["teacher"].training
    t2 = _trainer(sphere_pre, tmp_path / "run2", teacher_train_mode=False)
    seen.clear()
    t2.models["teacher"].register_forward_pre_hook(lambda m, a: seen.append(m.training))
    t2.models["teacher"].train()
    t2.teacher_forward(torch.randn(1, 1, 16, 16, 16))
    assert seen == [False] and t2.models["teacher"].training


def test_views_differ_between_student_and_teacher_and_repeat_per_step(sphere_pre, tmp_path):
    t = _trainer(sphere_pre, tmp_path / "run")
    x = torch.rand(2, 1, 16, 16, 16)
    s1, t1 = t.views(x, 5)
    s2, t2 = t.views(x, 5)
    s3, _ = t.views(x, 6)
    assert torch.equal(s1.image, s2.image) and torch.equal(t1.image, t2.image)
    assert not torch.equal(s1.image, t1.image) and not torch.equal(s1.image, s3.image)


def test_prediction_uses_the_teacher_and_resume_continues_it_exactly(sphere_pre, tmp_path):
    full = _trainer(sphere_pre, tmp_path / "full")
    assert full.inference_model() is full.models["teacher"]
    fit(full, quiet=True)
    cut = _trainer(sphere_pre, tmp_path / "cut")
    fit(cut, stop_at=4, quiet=True)  # "killed" after step 4: latest.pt holds student, teacher, optimiser
    resumed = _trainer(sphere_pre, tmp_path / "cut")
    fit(resumed, resume=True, quiet=True)
    for key in ("model", "teacher"):
        a, b = full.models[key].state_dict(), resumed.models[key].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), key
    assert not all(torch.equal(v, full.models["model"].state_dict()[k])
                   for k, v in full.models["teacher"].state_dict().items() if v.is_floating_point())
    ckpt = torch.load(tmp_path / "full" / "checkpoints" / "latest.pt", weights_only=True)
    assert ckpt["inference_model"] == "teacher" and set(ckpt["models"]) == {"model", "teacher"}
    assert set(ckpt["optimizers"]) == {"model"}
