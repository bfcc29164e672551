"""benchmarks/methods.py end to end at toy size: data built from real volumes, both arms trained
with the same labelled cases, held-out scans predicted from their raw files and scored, the
table, the JSON and the picture written. Measures nothing (2 steps); it keeps the harness alive."""

from __future__ import annotations

import importlib.util
import json
import os
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
            "| 0.025 [-0.050, 0.100] | 2.00 / 2.00 | 0.0 [0.0, 0.0] |") in table
    assert s["minutes"] == pytest.approx([2 / 60, 2 / 60])  # both arms' seconds, per seed

    assert h.write_table([], tmp_path).read_text() == "\n"  # only comparisons scored elsewhere: no empty header


def test_budgets_reach_only_comparisons_that_have_them(tmp_path, capsys):
    """``--budgets`` is refused for a comparison without labelled budgets (it used to be ignored)."""
    h = _harness()
    with pytest.raises(SystemExit) as e:
        h.main(["--method", "seran", "--budgets", "2", "--out", str(tmp_path)])
    assert e.value.code == 2 and "--budgets: seran has no labelled budgets" in capsys.readouterr().err


def test_all_runs_every_comparison_but_the_studies(tmp_path, monkeypatch):
    """``--all`` is the table README's figures rest on: every method once, no screen or study."""
    h = _harness()
    ran: list[str] = []
    monkeypatch.setattr(h, "build_data", lambda *a: h.Data(tmp_path, tmp_path, tmp_path))
    monkeypatch.setattr(h, "task_datasets", lambda *a: {})
    monkeypatch.setattr(h, "run_here", lambda job, *a: ran.append(job.method) or [])
    assert h.main(["--all", "--out", str(tmp_path)]) == 0
    assert sorted(set(ran)) == sorted(["infnet_704_aug_p64", "infnet_brain_352", "semi_infnet", "ugpcl", "canet_d16",
                                  "dodnet", "pcrl", "dcmt", "de_dcgcn_ee", "mrnet", "seran"])
    assert {c.method for c in h.COMPARISONS.values() if c.study} == {
        "infnet", "infnet_352", "infnet_704", "infnet_704_aug", "infnet_brain", "infnet_brain_352_aug",
        "ugpcl_native", "ugpcl_x2", "ugpcl_224_b16", "ugpcl_zoomed_data", "ugpcl_published_decoders", "ugpcl_semi",
        "ugpcl_semi_224", "canet"}


def test_a_zoomed_dataset_is_the_same_scans_cached_finer_in_plane(tmp_path, monkeypatch):
    """``ZOOMED``: the base dataset's raw files, preprocessed again with the 2D plan's in-plane
    spacing divided by the zoom (the slice axis kept); held-out files and labels unchanged."""
    import medvol.preprocessing

    h = _harness()
    base = h.Data(tmp_path / "pre", tmp_path / "raw" / "imagesTs", tmp_path / "raw" / "labelsTs")
    base.pre.mkdir()
    (base.pre / "plans.json").write_text(json.dumps(
        {"target_spacing": [3.0, 3.5, 7.0], "configurations": {"2d": {"in_plane_axes": [1, 2]}}}))
    calls = []
    monkeypatch.setattr(h, "build_data", lambda name, work, toy: base if name == "brain_tissue" else None)
    monkeypatch.setattr(medvol.preprocessing, "preprocess_dataset", lambda raw, out, **kw: calls.append((raw, out, kw)))
    data = h._zoomed("brain_tissue_x3.5", tmp_path, False)
    ((raw, out, kw),) = calls
    assert raw == tmp_path / "raw" and out == tmp_path / "data" / "brain_tissue_x3.5" / "pre" == data.pre
    assert kw["target_spacing"] == pytest.approx([3.0, 1.0, 2.0])
    assert (data.images, data.labels) == (base.images, base.labels)


def _namespace(h, tmp_path, *argv):
    import argparse

    a = argparse.Namespace(seeds=[0, 1], budgets=None, toy=False, out=tmp_path, jobs=2, arm=None)
    for k, v in zip(argv[::2], argv[1::2]):
        setattr(a, k, v)
    return a


def test_jobs_split_arms_by_seed_and_budget_and_keep_a_pretraining_arm_whole(tmp_path, monkeypatch):
    """One process per arm, seed and budget; an arm that pretrains runs its budgets in one process
    (one pretraining a seed); a module scored elsewhere is one process for every seed."""
    h = _harness()
    built: list[str] = []
    data = h.Data(tmp_path, tmp_path, tmp_path)
    monkeypatch.setattr(h, "build_data", lambda name, work, toy: built.append(name) or data)
    jobs = h.jobs_of(["pcrl", "ugpcl", "mrnet"], _namespace(h, tmp_path))
    assert built == ["brain_tissue", "brain_tissue"]  # before any process starts
    names = [j.name for j in jobs]
    assert names == ["pcrl_b1-2_PCRL_s0", "pcrl_b1_scratch_s0", "pcrl_b2_scratch_s0",
                     "pcrl_b1-2_PCRL_s1", "pcrl_b1_scratch_s1", "pcrl_b2_scratch_s1",
                     "ugpcl_b1_UGPCL_224_s0", "ugpcl_b2_UGPCL_224_s0", "ugpcl_b1_quickstart_2d_s0",
                     "ugpcl_b2_quickstart_2d_s0", "ugpcl_b1_UGPCL_224_s1", "ugpcl_b2_UGPCL_224_s1",
                     "ugpcl_b1_quickstart_2d_s1", "ugpcl_b2_quickstart_2d_s1",
                     "mrnet_s0-1"]
    pcrl = h.COMPARISONS["pcrl"].arm
    assert jobs[0].minutes == 2 * pcrl.minutes and jobs[-1].minutes == 2 * h.ELSEWHERE_MINUTES_A_SEED
    assert jobs[0].argv(_namespace(h, tmp_path)) == ["--method", "pcrl", "--seeds", "0", "--arm", "PCRL", "--budgets",
                                                     "1", "2", "--out", str(tmp_path)]
    assert jobs[-1].argv(_namespace(h, tmp_path, "budgets", [3], "toy", True)) == [
        "--method", "mrnet", "--seeds", "0", "1", "--budgets", "3", "--out", str(tmp_path), "--toy"]


def test_jobs_start_dearest_first_report_in_order_and_name_what_failed(tmp_path, monkeypatch, capsys):
    h = _harness()
    started: list[str] = []

    def fake(job, a):
        started.append(job.name)
        return None if job.arm == "scratch" else [{"job": job.name}]

    monkeypatch.setattr(h, "run_job", fake)
    jobs = [h.Job("pcrl", (0,), (1,), "scratch", 4), h.Job("pcrl", (0,), (1, 2), "PCRL", 24), h.Job("mrnet", (0,))]
    rows, failed = h.run_jobs(jobs, _namespace(h, tmp_path, "jobs", 1), deadline=float("inf"))
    assert started == ["pcrl_b1-2_PCRL_s0", "mrnet_s0", "pcrl_b1_scratch_s0"]
    assert rows == [{"job": "pcrl_b1-2_PCRL_s0"}, {"job": "mrnet_s0"}] and failed == [jobs[0]]
    rows, failed = h.run_jobs(jobs, _namespace(h, tmp_path, "jobs", 2), deadline=0.0)  # past its deadline
    assert rows == [] and failed == [] and capsys.readouterr().out.count("not run") == 3


def test_sigterm_starts_no_further_job_and_stops_the_running_one(tmp_path, monkeypatch):
    """``kill`` of the harness (SIGTERM, as Ctrl-C): the queued jobs never start, the running job's
    process is terminated, the interrupt propagates and the old SIGTERM handler is back."""
    import signal
    import subprocess
    import threading

    h = _harness()
    started, procs = [], []

    def fake(job, a):  # a job that runs a process, during which the harness is killed
        started.append(job.name)
        procs.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
        h.RUNNING.add(procs[-1])
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
        procs[-1].wait(timeout=30)
        return None

    monkeypatch.setattr(h, "run_job", fake)
    before = signal.getsignal(signal.SIGTERM)
    jobs = [h.Job("mrnet", (0,)), h.Job("mrnet", (1,))]
    with pytest.raises(KeyboardInterrupt):
        h.run_jobs(jobs, _namespace(h, tmp_path, "jobs", 1), deadline=float("inf"))
    assert procs[0].wait(timeout=30) == -signal.SIGTERM
    assert started == ["mrnet_s0"] and signal.getsignal(signal.SIGTERM) is before


@pytest.mark.slow
@pytest.mark.skipif(not available("nilearn"), reason="needs the nilearn wheel (the real MNI152 T1)")
def test_jobs_give_the_rows_of_one_process(tmp_path, one_torch_thread):
    """``--jobs 2`` (each run its own one-thread process) scores exactly what one process scores,
    rows in the same order; the pretraining is shared by the budgets."""
    h = _harness()
    for jobs in ("1", "2"):
        argv = ["--method", "pcrl", "--toy", "--seeds", "0", "1", "--jobs", jobs, "--out", str(tmp_path / jobs)]
        assert h.main(argv) == 0
    one, two = (json.loads((tmp_path / j / "methods.json").read_text())["runs"] for j in ("1", "2"))
    assert [(r["arm"], r["seed"], r["scores"]) for r in one] == [(r["arm"], r["seed"], r["scores"]) for r in two]
    assert [r["arm"] for r in two] == ["PCRL", "scratch", "PCRL", "scratch"]
    pretrained = sorted(p.name for p in (tmp_path / "2" / "runs" / "pcrl").glob("pretrain_s*"))
    assert pretrained == ["pretrain_s0", "pretrain_s1"]
    assert len(list((tmp_path / "2" / "jobs").glob("*.log"))) == 4


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


def _dcmt_module():
    sys.path.insert(0, str(HARNESS.parent))
    import methods_dcmt

    return methods_dcmt


def test_dcmt_split_holds_out_whole_grades_and_labels_a_third_of_each():
    m = _dcmt_module()
    grades = {f"s{i:02d}": i % 3 for i in range(15)}
    test, labelled = m.split(grades, 2, 6)
    assert len(test) == 6 and sorted(grades[s] for s in test) == [0, 0, 1, 1, 2, 2]
    assert sorted(grades[s] for s in labelled) == [0, 0, 1, 1, 2, 2] and not set(test) & set(labelled)
    assert labelled == ["s00", "s01", "s02", "s03", "s04", "s05"] and test == ["s09", "s10", "s11", "s12", "s13", "s14"]
    assert m.split(grades, 2, 3)[1] == ["s00", "s01", "s02"]  # the smaller budget: the first of each grade


@pytest.mark.slow
@pytest.mark.skipif(not available("nilearn"), reason="needs the nilearn wheel (the real MNI152 T1)")
def test_the_harness_runs_dcmt_against_its_supervised_arm_end_to_end(tmp_path, one_torch_thread):
    """DC-MT, the same network without the unlabelled subjects and a plain slice CNN, per seed,
    trained on the same labelled subjects and scored on every slice of the held-out subjects only."""
    import csv

    h, m = _harness(), _dcmt_module()
    assert h.main(["--method", "dcmt", "--toy", "--seeds", "0", "1", "--out", str(tmp_path)]) == 0
    runs = json.loads((tmp_path / "methods.json").read_text())["runs"]
    assert [(r["arm"], r["seed"]) for r in runs] == [(a, s) for s in (0, 1) for a in m.ARMS]
    assert m.ARMS == ("DC-MT", "supervised", "slice CNN")
    grades = json.loads((tmp_path / "data" / "dcmt" / "subject_grades.json").read_text())
    test, labelled = m.split(grades, 1, 3)
    with open(tmp_path / "data" / "dcmt" / "pre" / "slice_labels.csv", newline="") as f:
        held_slices = sum(1 for row in csv.DictReader(f) if row["slice_index"] and row["subject"] in test)
    tuning = json.loads((tmp_path / "runs" / "dcmt" / "tuning_b3.json").read_text())
    val = tuning["validation"]  # one training subject of each grade, neither held out nor labelled
    assert sorted(grades[s] for s in val) == [0, 1, 2] and not set(val) & set(test + labelled)
    assert set(tuning["scores"]) == {str(w) for w in m.TUNE_CLASS_CONSISTENCY}
    assert tuning["chosen"] in m.TUNE_CLASS_CONSISTENCY
    for r in runs:
        assert r["held_out"] == r["scored"] == test and r["labelled"] == labelled and len(labelled) == 3
        assert r["oversample_grades"] == 0.5
        assert r["subjects"] == len(test) and r["slices"] == held_slices
        dcmt = r["arm"] == "DC-MT"  # the unlabelled stream and the consistency terms: DC-MT's alone
        assert (r["unlabelled_per_batch"] > 0) == dcmt and (r["consistency"][1] > 0) == dcmt
        assert r["consistency"][0] == (tuning["chosen"] if dcmt else 0)  # the weight the validation subjects chose
        for k in m.METRICS:
            assert 0.0 <= r[k] <= 1.0, (k, r[k])
        arm_dir = tmp_path / "runs" / "dcmt" / f"b3_s{r['seed']}_{m.run_name(r['arm'])}"
        split = json.loads((arm_dir / "run" / "split.json").read_text())
        assert split["validation"] == test and not set(test) & set(split["labelled"] + split["unlabelled"])
        # the subject model on the arm's features: the same labelled subjects, the others unlabelled, test held out
        agg = json.loads((arm_dir / "aggregator" / "split.json").read_text())
        assert agg["labelled"] == labelled and agg["validation"] == test
        assert sorted(agg["unlabelled"]) == sorted(set(grades) - set(test) - set(labelled))
    table = (tmp_path / "methods.md").read_text()
    for row in ("| 3 | DC-MT | 2 | 2 |", "| 3 | supervised | 2 | 2 |", "| 3 | slice CNN | 2 | 2 |",
                "| 3 | DC-MT - supervised (paired) | 2 |", "| 3 | DC-MT - slice CNN (paired) | 2 |"):
        assert row in table
    assert (tmp_path / "dcmt.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the picture the table names
    # a rerun reuses every run, but an aggregator older than its (retrained) arm is trained again
    arm_dir = tmp_path / "runs" / "dcmt" / "b3_s0_supervised"
    kept, stale = arm_dir / "aggregator" / "train_summary.json", arm_dir / "run" / "train_summary.json"
    earlier = stale.stat().st_mtime - 10  # the aggregator trained before its arm's last run
    os.utime(kept, (earlier, earlier))
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs" / "dcmt").glob("b3_s*/*/train_summary.json")}
    assert h.main(["--method", "dcmt", "--toy", "--seeds", "0", "1", "--out", str(tmp_path)]) == 0
    after = {p: p.stat().st_mtime_ns for p in before}
    assert kept.stat().st_mtime > stale.stat().st_mtime
    assert [p for p in before if after[p] != before[p]] == [kept]
