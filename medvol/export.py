"""Portable model files: ``medvol export RUN -o model.zip`` and ``medvol predict -m model.zip``.

The zip holds what prediction needs and nothing else: ``recipe.yaml``, ``plans.json``,
``checkpoint.pt`` (the inference model's weights of the chosen checkpoint: no optimiser,
scheduler or RNG state; plain tensors, loaded with ``weights_only=True``) and
``manifest.json`` (format, which checkpoint and step, medvol and torch versions, the SHA-256
of every member). Reading checks the members (those four, each once: any other member is
refused, naming it), the checksums and the weights before anything is unpacked for use.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from medvol.errors import InputError
from medvol.utils import atomic_path

FORMAT = "medvol-model-1"
MEMBERS = ("recipe.yaml", "plans.json", "checkpoint.pt")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def export_model(run_dir: str | Path, out: str | Path, checkpoint: str = "best",
                 stop: Callable[[str], None] | None = None) -> Path:
    """Pack a run folder's model into ``out`` (a .zip). ``stop(what)``, called once the zip is
    written under a temporary name and before it is renamed to ``out``, may raise to stop
    (``medvol export`` on SIGTERM: :meth:`PreemptionFlag.stop_point`): nothing is left then."""
    from medvol import __version__
    from medvol.checkpoint import inference_weights, load_checkpoint, run_checkpoint
    from medvol.manifest import check_files, claim_files

    run_dir, out = Path(run_dir), Path(out)
    for f in ("recipe.yaml", "plans.json"):
        if not (run_dir / f).exists():
            raise InputError(run_dir, f"not a medvol run folder (no {f})")
    if (run_dir / "previous_stage.json").exists():  # a 3d_cascade_fullres run (medvol.training.cascade)
        raise InputError(run_dir, "a 3d_cascade_fullres run: its 3d_lowres run is part of the model and a model zip "
                                  "does not carry it yet; predict with `medvol predict -m` on the run folder")
    ckpt_path = run_checkpoint(run_dir, checkpoint)
    ckpt = load_checkpoint(ckpt_path)
    buf = io.BytesIO()
    torch.save({"models": {"model": inference_weights(ckpt)}, "inference_model": "model", "step": ckpt.get("step")},
               buf)
    data = {"recipe.yaml": (run_dir / "recipe.yaml").read_bytes(), "plans.json": (run_dir / "plans.json").read_bytes(),
            "checkpoint.pt": buf.getvalue()}
    manifest = {"format": FORMAT, "checkpoint": ckpt_path.stem, "step": ckpt.get("step"), "medvol": __version__,
                "torch": torch.__version__, "sha256": {k: _sha256(v) for k, v in data.items()}}
    check_files(out.parent, [out.name])  # after every check of the run: a refusal writes nothing
    with atomic_path(out) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            for name, payload in data.items():
                z.writestr(name, payload)
            z.writestr("manifest.json", json.dumps(manifest, indent=1))
        if stop is not None:
            stop(f"{out} not written (the run folder is unchanged); rerun the same command to export it")
        claim_files(out.parent, [out.name])
    return out


def read_model_zip(path: str | Path) -> dict[str, bytes]:
    """The zip's members, after checking they are all there, match their checksums and the
    weights load with ``weights_only=True``; one InputError naming the file otherwise."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            if "manifest.json" not in names:
                raise InputError(path, "not a medvol model file (no manifest.json); make one with `medvol export`")
            _check_members(path, z.namelist())
            manifest = json.loads(z.read("manifest.json"))
            missing = [m for m in MEMBERS if m not in names]
            if missing or manifest.get("format") != FORMAT:
                raise InputError(path, f"incomplete or unknown model file (missing {missing}, format "
                                       f"{manifest.get('format')!r})")
            data = {m: z.read(m) for m in MEMBERS}
    except (zipfile.BadZipFile, OSError, ValueError, KeyError) as e:
        raise InputError(path, f"not a readable model zip ({e})") from None
    for name, payload in data.items():
        if _sha256(payload) != manifest.get("sha256", {}).get(name):
            raise InputError(path, f"{name}: checksum mismatch (the file was changed or damaged)")
    try:
        torch.load(io.BytesIO(data["checkpoint.pt"]), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever the unpickler refuses is the file's problem
        raise InputError(path, f"checkpoint.pt is refused by torch.load(weights_only=True): {type(e).__name__}") \
            from None
    return data


def _check_members(path: Path, names: list[str]) -> None:
    """A model file holds the members ``export_model`` writes, each once, and nothing else:
    another member (``../../x``, an absolute path, a second ``plans.json``) means the file was
    changed after export, even though nothing but the known members is ever read."""
    known = (*MEMBERS, "manifest.json")
    for n in names:
        if n not in known or names.count(n) > 1:
            raise InputError(path, f"unexpected member {n!r}{' (a second copy)' if n in known else ''}: a medvol "
                                   f"model file holds only {', '.join(known)}, so it was changed after "
                                   "`medvol export`; export the model again")


@contextmanager
def unpacked_model(path: str | Path) -> Iterator[Path]:
    """A temporary run folder (recipe, plans, checkpoints/best.pt) made from a checked model zip."""
    data = read_model_zip(path)
    with tempfile.TemporaryDirectory(prefix="medvol-model-") as tmp:
        run = Path(tmp)
        (run / "checkpoints").mkdir()
        (run / "recipe.yaml").write_bytes(data["recipe.yaml"])
        (run / "plans.json").write_bytes(data["plans.json"])
        (run / "checkpoints" / "best.pt").write_bytes(data["checkpoint.pt"])
        os.link(run / "checkpoints" / "best.pt", run / "checkpoints" / "latest.pt")  # the zip holds one
        yield run
