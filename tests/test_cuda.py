"""Every path of medvol that branches on the device, run on CUDA (``pytest -m cuda``).

Skipped where ``torch.cuda.is_available()`` is False (this project's CPU machines);
``benchmarks/gpu_check.py`` runs this file first on a lent GPU. The paths (``grep -rn
"cuda\\|device.type" medvol/``):

- ``precision.choose_precision``: AMP in bf16 where the GPU has it, else fp16; cudnn.benchmark;
- ``engine.Trainer``: the fp16 GradScaler, its state in a checkpoint and on resume (loaded with
  ``map_location`` = the training device), pinned loader memory;
- ``checkpoint.rng_state``/``set_rng_state``: the CUDA generators, states loaded onto the GPU;
- ``sliding_window``: windows and float16 accumulation on the GPU, and the memory guard
  (``_accumulation_device``) that moves the accumulation to the CPU when it would not fit;
- ``precision.Precision.prepare``/``layout``: channels-last weights and inputs on CUDA;
- ``networks.dodnet``: the batched dynamic head and the task-conditioned model on the GPU;
- ``checkpoint.load_checkpoint``/``load_run``, ``export``: a CUDA checkpoint read onto the CPU;
- ``validation.device``, ``predictor.resolve_device``, ``distributed.setup``: ``--device``.

NCCL (``distributed.setup`` with several processes) needs one process per GPU: the check's
``ddp`` step runs it, not this file.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import torch.nn as nn

from medvol.checkpoint import load_checkpoint, load_run, rng_state, save_checkpoint, set_rng_state
from medvol.config import load_recipe
from medvol.errors import ConfigError
from medvol.precision import Precision, choose_precision

from conftest import sphere_case, write_v2_dataset

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

GPU = torch.device("cuda", 0)
CPU = torch.device("cpu")
TINY = ["model.base_features=4", "model.max_features=8", "data.patch_size=[16, 16, 16]", "data.batch_size=2",
        "data.num_workers=0", "trainer.log_every=1", "trainer.final_validation=false", "data.val_cases=[s1]"]


def _amp() -> str:
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Two bright spheres, preprocessed (the tiny dataset of conftest's ``tiny_run``)."""
    from medvol.preprocessing import preprocess_dataset

    tmp = tmp_path_factory.mktemp("cuda")
    cases = {f"s{i}": ([sphere_case(seed=i)[0]], sphere_case(seed=i)[1], np.eye(4)) for i in range(2)}
    root = write_v2_dataset(tmp / "Dataset004_Sphere", cases)
    preprocess_dataset(root, tmp / "pre", num_workers=1, quiet=True)
    return tmp / "pre"


def _trainer(cache, run, precision: str):
    from medvol.training import get_trainer
    from medvol.training.distributed import setup

    recipe = load_recipe("quickstart", TINY + [f"trainer.precision={precision}"])
    return get_trainer("supervised")(recipe, cache, run, setup("cuda"))


def _steps(trainer, n: int) -> None:
    from medvol.data import make_loader

    for step, batch in zip(range(n), make_loader(trainer.make_dataset(), 0, n, trainer.batch_size, 0, 1, 0)):
        assert batch["image"].is_pinned()  # pin_memory follows torch.cuda.is_available()
        batch = {k: v.to(GPU, non_blocking=True) for k, v in batch.items()}
        trainer.optimization_step(batch, step)


def _losses(run) -> dict[int, float]:
    with open(run / "metrics.csv") as f:
        return {int(r["step"]): float(r["value"]) for r in csv.DictReader(f) if r["name"] == "train/loss"}


def _devices(obj) -> set[str]:
    """The device types of every tensor inside a checkpoint's nested dicts and lists."""
    if isinstance(obj, torch.Tensor):
        return {obj.device.type}
    if isinstance(obj, dict):
        return set().union(*map(_devices, obj.values())) if obj else set()
    if isinstance(obj, (list, tuple)):
        return set().union(*map(_devices, obj)) if obj else set()
    return set()


def test_auto_precision_is_amp_in_what_this_gpu_supports():
    p = choose_precision(GPU)
    assert (p.name, p.device_type, p.channels_last) == (_amp(), "cuda", False)
    assert torch.backends.cudnn.benchmark is True
    assert choose_precision(GPU, "fp16").name == "fp16" and choose_precision(GPU, amp=False).name == "fp32"
    conv = nn.Conv3d(1, 2, 3).to(GPU)
    with p.autocast():
        assert conv(torch.randn(1, 1, 8, 8, 8, device=GPU)).dtype == p.dtype


def test_fp16_scaler_state_travels_through_a_checkpoint(cache, tmp_path):
    t = _trainer(cache, tmp_path / "a", "fp16")
    assert t.scaler.is_enabled() and next(t.models["model"].parameters()).device.type == "cuda"
    _steps(t, 3)
    t.scaler.update(new_scale=1234.0)  # a scale no fresh scaler has (they start at 2**16)
    save_checkpoint(tmp_path / "x.pt", t.state(3, 0.0))
    back = _trainer(cache, tmp_path / "b", "fp16")
    assert back.load_state(load_checkpoint(tmp_path / "x.pt", map_location=GPU))[0] == 3
    assert back.scaler.get_scale() == 1234.0
    assert back.scaler.state_dict() == t.scaler.state_dict()  # scale, growth tracker, factors
    if _amp() == "bf16":
        assert not _trainer(cache, tmp_path / "c", "bf16").scaler.is_enabled()


@pytest.mark.parametrize("precision", ["fp16", "auto"])
def test_resume_on_cuda_continues_the_uninterrupted_run(cache, tmp_path, precision):
    """The resume loads latest.pt with map_location=cuda (RNG states included, see
    set_rng_state). Not bit-exact here: cudnn.benchmark may pick other kernels in the second
    run; benchmarks/gpu_check.py measures the difference with deterministic algorithms."""
    from medvol.training import train

    r = load_recipe("quickstart", TINY + ["trainer.steps=4", "trainer.val_every=4", f"trainer.precision={precision}"])
    train(r, cache, tmp_path / "full", device="cuda", quiet=True)
    train(r, cache, tmp_path / "cut", device="cuda", stop_at=2, quiet=True)
    train(r, cache, tmp_path / "cut", device="cuda", resume=True, quiet=True)
    full, cut = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert sorted(cut) == sorted(full) == [0, 1, 2, 3]
    np.testing.assert_allclose([cut[s] for s in range(4)], [full[s] for s in range(4)], rtol=2e-2, atol=1e-3)


def test_cuda_rng_states_come_back_from_a_checkpoint_loaded_onto_the_gpu(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "rng.pt", {"rng": rng_state()})
    first = (torch.rand(4), torch.rand(4, device=GPU), np.random.rand(2))
    state = load_checkpoint(tmp_path / "rng.pt", map_location=GPU)["rng"]
    assert "cuda" in state and state["torch"].device.type == "cuda"
    set_rng_state(state)
    again = (torch.rand(4), torch.rand(4, device=GPU), np.random.rand(2))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    np.testing.assert_array_equal(first[2], again[2])


def test_a_cuda_checkpoint_loads_onto_the_cpu(cache, tmp_path):
    from medvol.export import export_model, unpacked_model
    from medvol.training import train

    r = load_recipe("quickstart", TINY + ["trainer.steps=1", "trainer.val_every=1"])
    train(r, cache, tmp_path / "run", device="cuda", quiet=True)
    raw = torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=True)  # no map_location
    assert "cuda" in _devices(raw["models"])  # saved from the GPU
    assert _devices(load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")) == {"cpu"}
    run = load_run(tmp_path / "run", CPU)
    assert {p.device.type for p in run.model.parameters()} == {"cpu"}
    with torch.no_grad():
        assert run.model(torch.zeros(1, 1, 16, 16, 16)).shape[1] == 2
    export_model(tmp_path / "run", tmp_path / "model.zip", checkpoint="latest")
    with unpacked_model(tmp_path / "model.zip") as unpacked:
        assert {p.device.type for p in load_run(unpacked, CPU).model.parameters()} == {"cpu"}


def _pointwise_net(out_ch=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 8, 1), nn.ReLU(), nn.Conv3d(8, out_ch, 1)).eval()


def _image(shape=(37, 29, 21)):
    return np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32)


def test_windows_and_float16_accumulation_on_the_gpu_match_the_cpu():
    from medvol.inference.sliding_window import _accumulation_device, sliding_window_probabilities

    net, image = _pointwise_net(), _image()
    assert _accumulation_device(GPU, 3, image.shape[1:]) == GPU
    ref = sliding_window_probabilities(net, image, [16, 16, 12], CPU, n_channels=3, mirror_axes=(0, 1, 2))
    for precision in (Precision("fp32", "cuda"), choose_precision(GPU)):
        out = sliding_window_probabilities(net.to(GPU), image, [16, 16, 12], GPU, n_channels=3,
                                           mirror_axes=(0, 1, 2), precision=precision)
        net.cpu()
        assert out.dtype == torch.float16 and out.device.type == "cpu" and out.shape == ref.shape
        tol = 5e-3 if precision.name == "fp32" else 3e-2  # fp32 convolutions may run in TF32 on the GPU
        torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=0)


def test_the_memory_guard_accumulates_on_the_cpu_when_the_gpu_is_short(monkeypatch):
    from medvol.inference import sliding_window as sw

    net, image = _pointwise_net(), _image()
    ref = sw.sliding_window_probabilities(net.to(GPU), image, [16, 16, 12], GPU, n_channels=3,
                                          precision=Precision("fp32", "cuda"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1024, 80 * 2**30))
    assert sw._accumulation_device(GPU, 3, image.shape[1:]) == CPU
    out = sw.sliding_window_probabilities(net, image, [16, 16, 12], GPU, n_channels=3,
                                          precision=Precision("fp32", "cuda"))
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-3, rtol=0)


def test_channels_last_on_cuda_is_the_same_function():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.InstanceNorm3d(4, affine=True), nn.ReLU(),
                        nn.Conv3d(4, 2, 1)).to(GPU).eval()
    x = torch.randn(2, 1, 16, 16, 16, device=GPU)
    plain = Precision(_amp(), "cuda")
    with torch.no_grad(), plain.autocast():
        ref = net(x).float()
    p = Precision(_amp(), "cuda", channels_last=True)
    with torch.no_grad(), p.autocast():
        out = p.prepare(net)(p.layout(x)).float()
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert p.layout(x).is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(out, ref, atol=5e-2, rtol=5e-2)


def test_dodnet_batched_head_and_model_on_the_gpu():
    from medvol.inference.sliding_window import TaskSigmoid, sliding_window_probabilities
    from medvol.networks.dodnet import DoDNet, dynamic_head, head_param_count

    torch.manual_seed(0)
    widths = (8, 8, 8, 2)
    feats, params = torch.randn(3, 8, 6, 7, 9), torch.randn(3, head_param_count(widths))
    on_gpu = dynamic_head(feats.to(GPU), params.to(GPU), widths)
    torch.testing.assert_close(on_gpu.cpu(), dynamic_head(feats, params, widths), atol=1e-3, rtol=1e-3)
    m = DoDNet(widths=(8, 16, 32, 64, 64), groups=8).to(GPU).eval()
    with torch.no_grad(), choose_precision(GPU).autocast():
        out = m(torch.randn(2, 1, 32, 32, 32, device=GPU), torch.tensor([0, 3], device=GPU))
    assert out.shape == (2, 2, 32, 32, 32) and torch.isfinite(out.float()).all()
    probs = sliding_window_probabilities(m, _image((40, 36, 32)), [32, 32, 32], GPU, TaskSigmoid(task=1),
                                         n_channels=2)
    assert probs.shape == (2, 40, 36, 32) and float(probs.min()) >= 0 and float(probs.max()) <= 1


def test_device_options_on_this_machine():
    from medvol import validation
    from medvol.inference.predictor import resolve_device
    from medvol.training.distributed import setup

    assert resolve_device("auto") == torch.device("cuda") and validation.device("cuda:0") == "cuda:0"
    assert setup("cuda").device == GPU and setup("auto").device == GPU
    n = torch.cuda.device_count()
    with pytest.raises(ConfigError, match=f"{n} CUDA device"):
        validation.device(f"cuda:{n}")
