"""An overlay cache (medvol.cache.link_overlay) and a case's label written into a cache
(medvol.cache.write_label): the overlay reads as the cache it links, takes labels of its own,
and never writes the linked cache."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medvol.cache import case_is_complete, link_overlay, list_cases, load_case, write_label
from medvol.errors import CacheError


def _cache(root):
    (root / "cases").mkdir(parents=True)
    (root / "plans.json").write_text('{"p": 1}')
    for case in ("a", "b"):
        np.save(root / "cases" / f"{case}.npy", np.arange(30, dtype=np.float32).reshape(1, 5, 3, 2))
        (root / "cases" / f"{case}.json").write_text(json.dumps({"case_id": case, "has_label": False,
                                                                 "shape_after_resampling": [5, 3, 2]}))
    return root


def _contents(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_an_overlay_reads_as_its_cache_and_takes_labels_of_its_own(tmp_path):
    src = _cache(tmp_path / "pre")
    before = _contents(src)
    dst = tmp_path / "overlay"
    link_overlay(src, dst)
    assert list_cases(dst) == ["a", "b"] and (dst / "cases" / "a.npy").is_symlink()
    assert not (dst / "plans.json").is_symlink() and (dst / "plans.json").read_text() == '{"p": 1}'
    seg = np.zeros((1, 5, 3, 2), np.int64)
    seg[0, 1:3, 1, :] = 1
    props = json.loads((src / "cases" / "a.json").read_text())
    write_label(dst, "a", seg, {**props, "pseudo_label": True}, classes=[1])
    image, label, p = load_case(dst, "a")
    assert label is not None and label.dtype == np.int8 and np.array_equal(label, seg)
    assert p["has_label"] and p["pseudo_label"] and case_is_complete(dst, "a")
    assert sorted(map(tuple, p["class_locations"]["1"])) == sorted(map(tuple, np.argwhere(seg[0] == 1)))
    np.testing.assert_array_equal(image, np.load(src / "cases" / "a.npy"))  # still the linked image
    assert load_case(dst, "b")[1] is None  # the other case is the source's
    assert _contents(src) == before  # nothing of the linked cache written


def test_linking_again_adds_what_is_new_and_keeps_what_the_overlay_wrote(tmp_path):
    src = _cache(tmp_path / "pre")
    dst = tmp_path / "overlay"
    link_overlay(src, dst)
    write_label(dst, "a", np.ones((1, 5, 3, 2)), {"case_id": "a", "shape_after_resampling": [5, 3, 2]}, [1])
    np.save(src / "cases" / "c.npy", np.zeros((1, 5, 3, 2), np.float32))
    (src / "cases" / "c.json").write_text('{"case_id": "c", "shape_after_resampling": [5, 3, 2]}')
    link_overlay(src, dst)
    assert list_cases(dst) == ["a", "b", "c"] and (dst / "cases" / "c.json").is_symlink()
    assert not (dst / "cases" / "a.json").is_symlink() and load_case(dst, "a")[1] is not None


def test_an_overlay_of_itself_is_refused(tmp_path):
    src = _cache(tmp_path / "pre")
    with pytest.raises(CacheError, match="an overlay cannot be the cache it links"):
        link_overlay(src, src)
