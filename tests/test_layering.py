"""The layering promises of docs/ARCHITECTURE.md, checked on the source (imports anywhere in
a module count, lazy ones inside functions included)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

MEDVOL = Path(__file__).resolve().parents[1] / "medvol"
APPLICATION_MODULES = {"cli.py", "__main__.py"}  # may use any library module (never datasets/ either)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports (``from a.b import c`` counts as ``a.b`` and ``a.b.c``)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def library_modules():
    return [p for p in sorted(MEDVOL.rglob("*.py")) if p.relative_to(MEDVOL).as_posix() not in APPLICATION_MODULES]


def test_imports_of_sees_lazy_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from medvol.datasets.mots import TASK_RULES\n")
    assert "medvol.datasets.mots" in imports_of(f)


def test_no_module_under_medvol_imports_datasets():
    """Not even the CLI: `medvol demo` runs the demo application of datasets/ as a process."""
    bad = {p.relative_to(MEDVOL).as_posix(): sorted(m for m in imports_of(p) if m.startswith("medvol.datasets")
                                                    or m == "datasets" or m.startswith("datasets."))
           for p in sorted(MEDVOL.rglob("*.py"))}
    assert not {k: v for k, v in bad.items() if v}


def test_inference_never_climbs_into_training():
    for p in (MEDVOL / "inference").rglob("*.py"):
        assert not [m for m in imports_of(p) if m.startswith("medvol.training")], p


def test_checkpoint_sits_below_training_and_inference():
    assert not [m for m in imports_of(MEDVOL / "checkpoint.py")
                if m.startswith(("medvol.training", "medvol.inference", "medvol.data"))]


def test_data_and_training_read_the_cache_without_the_preprocessing_driver():
    code = ("import sys, medvol.data, medvol.training.engine, medvol.training.dodnet, medvol.cache\n"
            "print(sorted(m for m in sys.modules if m.startswith('medvol.preprocessing')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_preprocessing_runs_without_torch_monai_or_skimage(tmp_path):
    """`medvol preprocess` (parent and forked workers) needs numpy and scipy only: importing
    torch alone would cost ~1.4 s of a run that takes ~3.5 s on six 1 mm brains (issue 21)."""
    from medvol.datasets.brain import Acquisition, build_brain_dataset

    raw = build_brain_dataset(tmp_path / "Dataset001_BrainTissue", n_train=2, n_test=0,
                              acquisitions=[Acquisition((3.0, 3.0, 3.0)), Acquisition((2.5, 2.5, 3.5))])
    code = ("import sys\nfrom medvol.cli import main\n"
            f"rc = main(['preprocess', {str(raw)!r}, '-o', {str(tmp_path / 'out')!r}, '-j', '1', '--quiet'])\n"
            "print(rc, sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'monai', 'skimage'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "0 []"
    assert (tmp_path / "out" / "cases" / "brain_001.npy").exists()


def test_lower_layers_never_import_a_stage():
    """losses, networks and io sit below training, inference and preprocessing (ramp-ups live
    in the foundation module medvol.ramps)."""
    stages = ("medvol.training", "medvol.inference", "medvol.preprocessing")
    for layer in ("losses", "networks", "io"):
        for p in (MEDVOL / layer).rglob("*.py"):
            assert not [m for m in imports_of(p) if m.startswith(stages)], p
