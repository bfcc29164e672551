"""``medvol demo``: the whole pipeline (``medvol.demo.run_demo``) on the built-in real data,
brain-tissue cases built from the MNI152 template in nilearn's wheel (``datasets/brain.py``).

An application in ``datasets/``, so that the library never depends on the dataset builders;
``medvol demo`` runs ``python -m medvol.datasets.demo`` with its own options.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medvol.datasets.brain import build_brain_dataset
from medvol.demo import run_demo


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="medvol demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("-j", "--workers", type=int, default=None)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--device", default="auto")
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args(argv)
    return run_demo(a.out, build_brain_dataset, workers=a.workers, quiet=a.quiet, steps=a.steps, device=a.device)


if __name__ == "__main__":
    sys.exit(main())
