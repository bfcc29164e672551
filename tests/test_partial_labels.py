"""Partial-label task rules and the channel targets built from them (numpy and torch)."""

from __future__ import annotations

import json

import numpy as np
import torch

from medvol.data.partial_labels import TASK_RULES, channel_targets, channel_targets_torch, rules_of_folder, task_rules


def test_channel_targets_follow_the_task_rules():
    lab = np.array([0, 1, 2])
    t, a = channel_targets(lab, 0)  # liver: organ = liver + tumour, tumour = 2
    assert t.tolist() == [[0, 1, 1], [0, 0, 1]] and a.tolist() == [True, True]
    t, a = channel_targets(lab, 2)  # hepatic vessel: vessel = 1 only
    assert t.tolist() == [[0, 1, 0], [0, 0, 1]]
    t, a = channel_targets(np.array([0, 1]), 4)  # colon: tumour only, organ unannotated
    assert t[1].tolist() == [0, 1] and a.tolist() == [False, True]
    assert len(TASK_RULES) == 7


def test_torch_targets_equal_the_numpy_ones_per_sample():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 3, (7, 1, 4, 5, 3))
    tasks = np.arange(7)
    t, a = channel_targets_torch(torch.from_numpy(label), torch.from_numpy(tasks), TASK_RULES)
    for s in range(7):
        ref_t, ref_a = channel_targets(label[s, 0], int(tasks[s]))
        np.testing.assert_array_equal(t[s].numpy(), ref_t)
        np.testing.assert_array_equal(a[s].numpy().astype(bool), ref_a)


def test_a_dataset_declares_its_own_rules(tmp_path):
    assert rules_of_folder(tmp_path) is TASK_RULES  # no dataset.json: MOTS's
    tasks = {"0": {"name": "brain", "organ": [1, 2], "tumour": None}, "1": {"name": "wm", "organ": None,
                                                                           "tumour": [2]}}
    (tmp_path / "dataset.json").write_text(json.dumps({"tasks": tasks}))
    assert rules_of_folder(tmp_path) == {0: ("brain", (1, 2), None), 1: ("wm", None, (2,))}
    assert task_rules({"tasks": {"0": "liver"}}) is TASK_RULES  # names only: MOTS's rules
