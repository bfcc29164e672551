"""benchmarks/methods.py end to end at toy size: data built from real volumes, both arms trained
with the same labelled cases, held-out scans predicted from their raw files and scored, the
table, the JSON and the picture written. Measures nothing (2 steps); it keeps the harness alive."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from medvol.datasets.realdata import available

HARNESS = Path(__file__).resolve().parents[1] / "benchmarks" / "methods.py"


def _harness():
    spec = importlib.util.spec_from_file_location("methods_harness", HARNESS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_paired_differences_and_table_from_rows(tmp_path):
    h = _harness()
    rows = [{"method": "infnet", "arm": arm, "budget": 24, "seed": s, "seconds": 1.0,
             "scores": {"bone": {"dice": d, "hd95": 2.0}}}
            for s, (m, b) in enumerate([(0.9, 0.8), (0.7, 0.75)]) for arm, d in (("Inf-Net", m), ("quickstart_2d", b))]
    (s,) = h.summarise(rows)
    assert s["dice"] == {"Inf-Net": [0.9, 0.7], "quickstart_2d": [0.8, 0.75]}
    assert s["diff"] == pytest.approx([0.1, -0.05])
    table = h.write_table([s], tmp_path).read_text()
    assert ("| Inf-Net | 24 | bone | 0.800 [0.700, 0.900] | quickstart_2d | 0.775 [0.750, 0.800] "
            "| 0.025 [-0.050, 0.100] |") in table


@pytest.mark.slow
@pytest.mark.skipif(not available("pydicom-data"), reason="needs the pydicom-data wheel (real CT)")
def test_the_harness_runs_a_comparison_end_to_end(tmp_path, one_torch_thread):
    h = _harness()
    assert h.main(["--method", "infnet", "--toy", "--seeds", "0", "--out", str(tmp_path)]) == 0
    runs = json.loads((tmp_path / "methods.json").read_text())["runs"]
    assert [r["arm"] for r in runs] == ["Inf-Net", "quickstart_2d"]
    for r in runs:  # both arms scored on the same two held-out slices, bone Dice a real number
        assert set(r["scores"]) == {"bone"} and 0.0 <= r["scores"]["bone"]["dice"] <= 1.0
    assert len(list((tmp_path / "runs" / "infnet").glob("b2_s0_*/pred/*.nii.gz"))) == 4
    assert "| Inf-Net | 2 |" in (tmp_path / "methods.md").read_text()
    assert (tmp_path / "infnet.png").stat().st_size > 1000
    merged = tmp_path / "merged"  # runs of several --out folders in one table
    assert h.main(["--merge", str(tmp_path), str(tmp_path), "--out", str(merged)]) == 0
    assert len(json.loads((merged / "methods.json").read_text())["runs"]) == 4


def test_semi_infnet_stages_are_sized_in_epochs_of_their_own_slices():
    """An epoch of k slices is ceil(k / 8) x 3 steps: the initial stage is ~300 steps (the
    supervised Inf-Net arm's run) at every budget, pretrain ~300 over the grown pool."""
    h = _harness()
    for budget, initial, pretrain in ((8, 100, 25), (24, 33, 17)):
        sets = dict(s.split("=") for s in h.semi_infnet_stages(budget, 300))
        assert int(sets["method.initial.epochs"]) == initial and int(sets["method.pretrain.epochs"]) == pretrain
        steps = int(sets["method.initial.epochs"]) * -(-budget // 8) * 3
        assert abs(steps - 300) <= 9
        assert sets["method.max_rounds"] == "4" and sets["method.per_round"] == "6"
