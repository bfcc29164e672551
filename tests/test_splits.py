"""Cross-validation folds in nnU-Net v2's format and by its rule."""

from __future__ import annotations

import json

import pytest

from medvol.config import DataConfig, load_recipe
from medvol.data import training_cases
from medvol.data.splits import fold_cases, nnunet_splits
from medvol.errors import ConfigError, InputError

# Validation indices (into the sorted ids) of sklearn.model_selection.KFold(5, shuffle=True,
# random_state=12345).split(ids), which nnU-Net v2's generate_crossval_split calls; computed
# once with scikit-learn 1.x, kept here as the reference.
SKLEARN_VAL = {13: [[0, 7, 9], [3, 6, 10], [8, 11, 12], [1, 4], [2, 5]],
               7: [[3, 6], [0, 4], [1], [5], [2]],
               5: [[0], [4], [3], [1], [2]]}


@pytest.mark.parametrize("n", sorted(SKLEARN_VAL))
def test_generated_split_is_nnunets(n):
    ids = [f"case_{i:03d}" for i in range(n)]
    splits = nnunet_splits(ids[::-1])  # any order in: sorted first, as nnU-Net does
    assert [s["val"] for s in splits] == [[ids[i] for i in v] for v in SKLEARN_VAL[n]]
    for s in splits:
        assert s["train"] == [c for c in ids if c not in s["val"]]


def test_fewer_cases_than_folds_is_an_error():
    with pytest.raises(ConfigError, match="at least 5 cases"):
        nnunet_splits(["a", "b"])


def test_splits_file_is_written_once_and_honoured(tmp_path):
    ids = [f"c{i}" for i in range(7)]
    train, val = fold_cases(tmp_path, ids, 1)
    written = json.loads((tmp_path / "splits_final.json").read_text())
    assert written == nnunet_splits(ids) and val == written[1]["val"] and train == written[1]["train"]
    mine = [{"train": ids[2:], "val": ids[:2]}, {"train": ids[:5], "val": ids[5:]}]  # e.g. nnU-Net's own file
    (tmp_path / "splits_final.json").write_text(json.dumps(mine))
    assert fold_cases(tmp_path, ids, 1) == (ids[:5], ids[5:])
    assert fold_cases(tmp_path, ids, "all") == (ids, ids)
    with pytest.raises(ConfigError, match="folds 0..1"):
        fold_cases(tmp_path, ids, 3)
    (tmp_path / "splits_final.json").write_text(json.dumps([{"train": ["zz"], "val": []}]))
    with pytest.raises(InputError, match="not in the cache"):
        fold_cases(tmp_path, ids, 0)


def test_fold_selects_training_and_validation_cases(brain_pre, tmp_path):
    import shutil

    pre = tmp_path / "pre"
    shutil.copytree(brain_pre, pre)
    (pre / "splits_final.json").unlink(missing_ok=True)
    lab, unlab, val = training_cases(pre, DataConfig(fold=0), 0)
    splits = json.loads((pre / "splits_final.json").read_text())
    assert sorted(lab + unlab) == splits[0]["train"] and val == splits[0]["val"]
    # an explicit val_cases wins over the fold
    lab, unlab, val = training_cases(pre, DataConfig(fold=0, val_cases=["brain_000"]), 0)
    assert val == ["brain_000"]
    assert load_recipe("quickstart", ["data.fold=all"]).data.fold == "all"
    with pytest.raises(ConfigError, match="data.fold"):
        load_recipe("quickstart", ["data.fold=-1"])
