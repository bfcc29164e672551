"""The layering promises of docs/ARCHITECTURE.md, checked on the source (imports anywhere in
a module count, lazy ones inside functions included)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

MEDVOL = Path(__file__).resolve().parents[1] / "medvol"
APPLICATION_MODULES = {"cli.py", "__main__.py"}  # may use any library module (never datasets/ either)

# The rows of docs/ARCHITECTURE.md ("Layers"), lowest first. A module belongs to the unit of the
# longest prefix naming it; it imports its own unit and the units of lower rows, never a unit of
# its own row or of a higher one (the foundation modules may import each other; the
# application modules anything).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("medvol", "medvol.errors", "medvol.utils", "medvol.ramps", "medvol.resources",
                    "medvol.validation", "medvol.config", "medvol.precision", "medvol.plans", "medvol.cache",
                    "medvol.manifest", "medvol.resampling", "medvol.labels")),
    ("io", ("medvol.io",)),
    ("losses", ("medvol.losses",)),
    ("networks", ("medvol.networks",)),
    ("checkpoints", ("medvol.checkpoint",)),
    ("shared stages", ("medvol.preprocessing", "medvol.data", "medvol.evaluation", "medvol.export")),
    ("stages", ("medvol.training", "medvol.inference")),
    ("application", ("medvol.cli", "medvol.__main__", "medvol.demo")),
]
# The one exception to "a row never imports its own row": training validates, and predicts at
# its end, through inference's paths (one sliding window, one post-processing, one predictor).
TRAINING_MAY_USE = ("medvol.inference.sliding_window", "medvol.inference.postprocess", "medvol.inference.predictor")


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


def module_name(path: Path) -> str:
    parts = path.relative_to(MEDVOL.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(MEDVOL.rglob("*.py"))}


def resolve(name: str, modules: dict[str, Path] = MODULES) -> str:
    """The medvol module an import names (``medvol.cache.load_case`` -> ``medvol.cache``)."""
    while name not in modules and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def row_and_unit(module: str) -> tuple[int, str]:
    found = [(row, unit) for row, (_, units) in enumerate(LAYERS) for unit in units
             if module == unit or (unit != "medvol" and module.startswith(unit + "."))]
    assert found, f"{module} is in no row of LAYERS: place it (and in docs/ARCHITECTURE.md)"
    return max(found, key=lambda f: len(f[1]))


def layer_violations(modules: dict[str, Path] = MODULES) -> list[str]:
    """``"a -> b (why)"`` for every import that breaks the order of LAYERS."""
    out = []
    application = len(LAYERS) - 1
    for name, path in modules.items():
        row, unit = row_and_unit(name)
        imported = {resolve(m, modules) for m in imports_of(path) if m == "medvol" or m.startswith("medvol.")}
        for target in sorted(imported):
            t_row, t_unit = row_and_unit(target)
            if t_unit == unit or row == application or t_row < row or (row == t_row == 0):
                continue
            if unit == "medvol.training" and target.startswith(TRAINING_MAY_USE):
                continue
            where = "its own row" if t_row == row else f"a higher row ({LAYERS[t_row][0]})"
            out.append(f"{name} -> {target} ({LAYERS[row][0]} importing {where})")
    return out


def test_every_module_has_a_row():
    for name in MODULES:
        row_and_unit(name)


def test_every_import_goes_down_the_layers():
    assert layer_violations() == []


def test_layer_check_sees_a_bad_import(tmp_path):
    """The check can fail: losses importing the training stage is reported."""
    f = tmp_path / "bad.py"
    f.write_text("def g():\n    from medvol.training.schedules import make_scheduler\n")
    assert layer_violations({"medvol.losses.bad": f}) == [
        "medvol.losses.bad -> medvol.training.schedules (losses importing a higher row (stages))"]


def test_prediction_loads_no_preprocessing_driver():
    """The geometry restore, PCRL's scan folders, the metrics (class names of a raw dataset) and
    the predictor load no preprocessing module; the per-case transform loads its operations only,
    opening a raw layout its module only: never the dataset driver, fingerprints or planning."""
    code = ("import sys\n"
            "import medvol.inference.geometry, medvol.inference.predictor, medvol.data.pretext\n"
            "import medvol.evaluation.metrics\n"
            "def loaded():\n    return sorted(m for m in sys.modules if m.startswith('medvol.preprocessing'))\n"
            "print(loaded())\nfrom medvol.preprocessing import preprocess_case\nprint(loaded())\n"
            "from medvol.preprocessing import open_raw_dataset\nprint(loaded())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    per_case = ["medvol.preprocessing", "medvol.preprocessing.cropping", "medvol.preprocessing.normalization",
                "medvol.preprocessing.transform"]
    assert out.strip().splitlines() == [str([]), str(per_case), str(sorted([*per_case, "medvol.preprocessing.raw"]))]


def import_cycles(modules: dict[str, Path] = MODULES) -> list[list[str]]:
    """Groups of modules that import each other, directly or around a loop (a package and its
    own submodules, the registries, left out)."""
    graph = {name: {t for t in (resolve(m, modules) for m in imports_of(path) if m.startswith("medvol."))
                    if t != name and not t.startswith(name + ".") and not name.startswith(t + ".")}
             for name, path in modules.items()}
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        order[v] = low[v] = len(order)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in order:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], order[w])
        if low[v] == order[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
            if len(group) > 1:
                cycles.append(sorted(group))

    for v in sorted(graph):
        if v not in order:
            visit(v)
    return cycles


def test_cycle_check_sees_a_cycle(tmp_path):
    (tmp_path / "a.py").write_text("import medvol.b\n")
    (tmp_path / "b.py").write_text("def f():\n    from medvol.a import x\n")
    assert import_cycles({"medvol.a": tmp_path / "a.py", "medvol.b": tmp_path / "b.py"}) == [["medvol.a", "medvol.b"]]


def test_training_never_imports_inference_subjects():
    """The subject pipeline is a stage of its own: training uses only TRAINING_MAY_USE."""
    users = [p.relative_to(MEDVOL).as_posix() for p in (MEDVOL / "training").rglob("*.py")
             if any(m.startswith("medvol.inference.subjects") for m in imports_of(p))]
    assert users == []


def test_no_import_cycles():
    """engine -> final_validation one way: validate_at_end takes plain values, not the trainer."""
    assert import_cycles() == []
