"""Small helpers shared by every stage: atomic writes, JSON of numpy values, the AMP dtype."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np


def _tmp_name(path: Path) -> Path:
    # The temp file keeps the real suffixes (".nii.gz", ".npy") because some writers pick
    # their format from the name; the leading dot and ".part" tag mark it as unfinished.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part" + "".join(path.suffixes[-2:]),
                               dir=path.parent)
    os.close(fd)
    return Path(tmp)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    On any exception the temporary file is removed, so no half-written file is left.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def to_jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays and tuples inside ``obj`` to plain JSON types."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(to_jsonable(obj), indent=1))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def save_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array))


def cuda_amp_dtype(device, enabled: bool = True):
    """The autocast dtype for ``device``: bf16 where the GPU supports it, else fp16; None on
    CPU or when disabled (CPU runs are fp32). Turns cuDNN's autotuner on for CUDA runs."""
    import torch

    if getattr(device, "type", str(device)) != "cuda" or not enabled:
        return None
    torch.backends.cudnn.benchmark = True
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
