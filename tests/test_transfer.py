"""Fine-tuning across datasets: `medvol plan --from-plans` (nnU-Net's
move_plans_between_datasets) and `init_from` a checkpoint of another dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medvol.errors import ConfigError
from medvol.preprocessing.planning import plan_experiment, transfer_plans

from conftest import sphere_case, write_v2_dataset

CT_THERE = {"mean": 80.0, "std": 20.0, "percentile_00_5": -50.0, "percentile_99_5": 300.0}
CT_HERE = {"mean": 30.0, "std": 5.0, "percentile_00_5": 0.0, "percentile_99_5": 60.0}
THERE = ({"spacings": [[0.8, 0.8, 3.0]] * 8, "shapes_after_crop": [[256, 256, 40]] * 8,
          "median_relative_size_after_cropping": 0.9, "foreground_intensity_properties_per_channel": {"0": CT_THERE}},
         {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 2}})
HERE = ({"spacings": [[1.0, 1.0, 1.0]] * 4, "shapes_after_crop": [[100, 100, 100]] * 4,
         "median_relative_size_after_cropping": 0.9, "foreground_intensity_properties_per_channel": {"0": CT_HERE}},
        {"channel_names": {"0": "ct"}, "labels": {"background": 0, "kidney": 1}})


def test_transferred_plans_are_the_sources_but_for_this_datasets_labels_and_shapes():
    source = plan_experiment(*THERE)
    own = plan_experiment(*HERE)
    assert own["target_spacing"] != source["target_spacing"] and own["patch_size"] != source["patch_size"]
    plans = transfer_plans(source, *HERE, source_path="there/plans.json")
    for key in ("target_spacing", "patch_size", "batch_size", "network", "resampling", "cache_dtype",
                "nnunet_transpose_forward"):
        assert plans[key] == source[key], key
    assert plans["normalization"][0]["scheme"] == "CTNormalization"
    assert plans["normalization"][0]["statistics"] == CT_THERE  # nnU-Net moves the CT clip values, mean, std too
    assert plans["normalization"][0]["name"] == "ct"
    assert plans["labels"] == HERE[1]["labels"] and plans["channel_names"] == {"0": "ct"}
    # this dataset's 100^3 cases at 1 mm resampled to the source's 0.8 x 0.8 x 3 mm: 125 x 125 x 33
    assert plans["median_shape_after_resampling"] == [125.0, 125.0, 33.0]
    two_d, src_2d = plans["configurations"]["2d"], source["configurations"]["2d"]
    assert two_d["patch_size"] == src_2d["patch_size"] and two_d["network"] == src_2d["network"]
    assert two_d["median_shape"] == [125.0, 125.0]
    record = plans["transferred_from"]
    assert record["plans"] == "there/plans.json" and "patch_size" in record["from_source"]
    assert "labels" in record["from_this_dataset"] and "labels" not in record["from_source"]
    assert any("2 here" in n and "segmentation head" in n for n in record["notes"])
    own_stats = transfer_plans(source, *HERE, own_intensities=True)
    assert own_stats["normalization"][0]["statistics"] == CT_HERE
    assert own_stats["patch_size"] == source["patch_size"]


def test_plans_of_another_channel_count_do_not_transfer():
    two = (HERE[0] | {"foreground_intensity_properties_per_channel": {"0": CT_HERE, "1": CT_HERE}},
           HERE[1] | {"channel_names": {"0": "ct", "1": "pet"}})
    with pytest.raises(ConfigError, match="1 image channel.*2"):
        transfer_plans(plan_experiment(*THERE), *two, source_path="there/plans.json")


def _dynunet(in_channels, classes):
    from monai.networks.nets import DynUNet

    return DynUNet(3, in_channels, classes, [[3, 3, 3]] * 3, [[1, 1, 1], [2, 2, 2], [2, 2, 2]], [[2, 2, 2]] * 2,
                   filters=[4, 8, 8], deep_supervision=True, deep_supr_num=1)


def test_init_from_names_the_head_and_the_input_layer_it_could_not_load(tmp_path):
    from medvol.training.transfer import init_from

    torch.manual_seed(0)
    there = _dynunet(2, 3)
    torch.save(there.state_dict(), tmp_path / "w.pt")
    here = _dynunet(1, 2)
    report = init_from(here, tmp_path / "w.pt")
    parts = {p["part"]: p for p in report["not_transferred"]}
    assert set(parts) == {"segmentation head", "input layer"}
    assert parts["segmentation head"]["why"] == "3 classes in the checkpoint, 2 here"
    assert {k.split(".")[0] for k in parts["segmentation head"]["tensors"]} == {
        "output_block", "deep_supervision_heads", "skip_layers"}  # DynUNet also names its heads under skip_layers
    assert parts["input layer"]["why"] == "2 input channels in the checkpoint, 1 here"
    assert "input_block.conv1.conv.weight" in parts["input layer"]["tensors"]
    assert all(k.endswith("conv1.conv.weight") for k in parts["input layer"]["tensors"])
    sd, theirs = here.state_dict(), there.state_dict()
    rest = [k for k in sd if k not in parts["segmentation head"]["tensors"] + parts["input layer"]["tensors"]]
    assert sorted(report["loaded"]) == sorted(rest)
    for k in rest:
        torch.testing.assert_close(sd[k], theirs[k])


def test_a_head_of_other_labels_is_not_loaded_even_when_its_shape_fits(tmp_path):
    """Same class count, other classes (the checkpoint's run folder names its labels): the
    head is left as initialised (nnU-Net never loads its seg layers); same labels: loaded."""
    from medvol.training.transfer import head_tensors, init_from

    torch.manual_seed(0)
    there = _dynunet(1, 2)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save(there.state_dict(), tmp_path / "run" / "checkpoints" / "latest.pt")
    (tmp_path / "run" / "plans.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1}}))
    here = _dynunet(1, 2)
    head = head_tensors(here)
    report = init_from(here, tmp_path / "run" / "checkpoints" / "latest.pt", {"background": 0, "kidney": 1})
    (part,) = report["not_transferred"]
    assert part["part"] == "segmentation head" and set(part["tensors"]) == head and "liver" in part["why"]
    assert not head & set(report["loaded"]) and len(report["loaded"]) == len(here.state_dict()) - len(head)
    same = init_from(_dynunet(1, 2), tmp_path / "run" / "checkpoints" / "latest.pt", {"background": 0, "liver": 1})
    assert not same["not_transferred"] and head <= set(same["loaded"])


def test_from_plans_of_a_missing_file_is_one_error(tmp_path, capsys):
    from medvol.cli import main

    raw = write_v2_dataset(tmp_path / "Dataset003_C", {"c0": ([sphere_case()[0]], sphere_case()[1], np.eye(4))})
    assert main(["fingerprint", str(raw), "-o", str(tmp_path / "pre"), "-j", "1", "--quiet"]) == 0
    assert main(["plan", str(tmp_path / "pre"), "--from-plans", str(tmp_path / "nope.json"), "--quiet"]) == 2
    assert f"{tmp_path / 'nope.json'}: not found" in capsys.readouterr().err


TINY = ["model.base_features=4", "model.max_features=8", "data.batch_size=2", "data.num_workers=0",
        "trainer.steps=1", "trainer.val_every=1", "trainer.final_validation=false"]


def test_plan_from_plans_then_init_from_across_datasets(tmp_path, capsys):
    """Dataset A (liver + tumour, 2 mm voxels) trained; dataset B (one class, 1 mm voxels)
    planned with A's plans and fine-tuned from A's checkpoint: everything but the head loads."""
    from medvol.cli import main
    from medvol.config import load_recipe
    from medvol.training import train

    cases_a = {}
    for i in range(3):
        image, label, _ = sphere_case(seed=i)
        label[label > 0] = 1
        label[10:13, 10:13, 8:11] = 2
        cases_a[f"a{i}"] = ([image], label, np.diag([2.0, 2.0, 2.0, 1.0]))
    raw_a = write_v2_dataset(tmp_path / "Dataset001_A", cases_a, labels={"background": 0, "liver": 1, "tumour": 2})
    raw_b = write_v2_dataset(tmp_path / "Dataset002_B", {f"b{i}": ([sphere_case(seed=9 + i)[0]],
                                                                   sphere_case(seed=9 + i)[1], np.eye(4))
                                                         for i in range(3)})
    assert main(["preprocess", str(raw_a), "-o", str(tmp_path / "pre_a"), "-j", "1", "--quiet"]) == 0
    assert main(["fingerprint", str(raw_b), "-o", str(tmp_path / "pre_b"), "-j", "1", "--quiet"]) == 0
    plans_a = json.loads((tmp_path / "pre_a" / "plans.json").read_text())
    assert main(["plan", str(tmp_path / "pre_b"), "--from-plans", str(tmp_path / "pre_a" / "plans.json"),
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "transferred from" in out and "not transferred: labels differ" in out
    plans_b = json.loads((tmp_path / "pre_b" / "plans.json").read_text())
    assert plans_b["target_spacing"] == plans_a["target_spacing"] == [2.0, 2.0, 2.0]  # A's, not B's 1 mm
    assert plans_b["network"] == plans_a["network"] and plans_b["labels"] == {"background": 0, "fg": 1}
    assert main(["plan", str(tmp_path / "pre_b"), "--from-plans", str(tmp_path / "pre_a" / "plans.json"),
                 "--target-spacing", "1", "1", "1", "--quiet"]) == 2  # the transferred plans decide it
    assert main(["preprocess", str(raw_b), "-o", str(tmp_path / "pre_b"), "-j", "1", "--quiet",
                 "--from-plans", str(tmp_path / "pre_a" / "plans.json")]) == 0
    train(load_recipe("quickstart", TINY + ["data.val_cases=[a0]"]), tmp_path / "pre_a", tmp_path / "run_a",
          device="cpu", quiet=True)
    ckpt = tmp_path / "run_a" / "checkpoints" / "latest.pt"
    train(load_recipe("quickstart", TINY + ["data.val_cases=[b0]", f"init_from={ckpt}",
                                            "trainer.freeze_init_steps=1"]),
          tmp_path / "pre_b", tmp_path / "run_b", device="cpu", quiet=True)
    report = json.loads((tmp_path / "run_b" / "init_report.json").read_text())
    (head,) = report["not_transferred"]
    assert head["part"] == "segmentation head" and head["why"] == "3 classes in the checkpoint, 2 here"
    a = torch.load(ckpt, weights_only=True)["models"]["model"]
    b = torch.load(tmp_path / "run_b" / "checkpoints" / "latest.pt", weights_only=True)["models"]["model"]
    assert set(report["loaded"]) == set(a) - set(head["tensors"]) and report["loaded"]
    for k in report["loaded"]:
        if k.endswith("weight"):
            torch.testing.assert_close(b[k], a[k])  # loaded, and frozen for the one step
