"""Mean-teacher training: a student learns, a teacher follows it as an exponential moving average
(Tarvainen & Valpola 2017), and losses ask the student to agree with the teacher on another view
of the same batch. DC-MT configures it (DC-MT, Huo et al., MedIA 2022; ``docs/methods/dcmt.md``);
other consistency methods can too.

What a subclass gets, and the small API it builds on:

- ``self.models["model"]``, the student (the only model in an optimiser), and
  ``self.models["teacher"]``, a copy whose parameters never require a gradient. After every
  optimisation step the teacher moves towards the student with decay
  ``min(1 - 1/(step + 1), ema_decay)`` (:func:`teacher_decay`, ``step`` the 0-based step just
  done: at step 0 the teacher becomes the student, then it averages more and more).
  ``ema_buffers`` decides the teacher's BatchNorm statistics: ``False`` (default, as the
  published mean teacher and DC-MT) keeps the teacher's own, updated by its own forward passes
  in train mode; ``True`` copies the student's.
- Prediction and validation use the teacher (``inference_key = "teacher"``; set it to
  ``"model"`` in a subclass for the student). Checkpoints hold it like any other model, so
  resume continues it exactly and ``init_from`` a mean-teacher checkpoint loads the teacher.
- :meth:`views` gives two independently perturbed views of a batch (:mod:`medvol.data.perturb`:
  brightness/contrast, blur, noise, flips, small affine), drawn from ``(trainer.seed, step)``
  so resume repeats them. Each view keeps its affine: a loss that compares spatial maps brings
  them into one frame (``student.from_frame(mask)`` for targets in the batch's frame,
  ``student.from_frame(teacher_map, teacher)`` for the teacher's maps); logits need nothing.
- :meth:`teacher_forward` runs the teacher without gradient (train mode by default, as
  published: dropout and batch statistics are part of its noise).
- :meth:`labelled_mask`: which samples carry labels. Two-stream batches come from the recipe
  (``data.unlabelled_per_batch``: that many unlabelled samples at the end of every
  per-process batch, ``batch["labelled"]`` False for them).

A subclass writes ``training_step(batch, step) -> {"loss": ..., ...}`` and, when its network,
data or metrics differ from segmentation's, ``build_student``/``make_dataset``/``validate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from monai.networks import eval_mode, train_mode

from medvol.data.perturb import PerturbConfig, View, make_view
from medvol.training.ema import frozen_copy, teacher_decay, update_teacher
from medvol.training.engine import Trainer, unwrap


@dataclass
class MeanTeacherOptions:
    """The mean-teacher settings of a recipe's ``method`` section (subclass it for a method's
    own): the teacher's ``ema_decay`` (the cap of :func:`teacher_decay`), whether it copies the
    student's BatchNorm statistics (``ema_buffers``) or keeps its own, whether its forward runs
    in train mode (``teacher_train_mode``, published), and the two views' ``perturb``ations."""

    ema_decay: float = 0.99
    ema_buffers: bool = False  # copy the student's BatchNorm statistics into the teacher (else its own)
    teacher_train_mode: bool = True  # the teacher's forward in train mode (dropout, batch statistics)
    perturb: PerturbConfig = field(default_factory=PerturbConfig)


class MeanTeacherTrainer(Trainer):
    """Base of mean-teacher trainers (not registered: a subclass names a method and its step):
    ``models["model"]`` the student, the only model an optimiser updates, and
    ``models["teacher"]`` its EMA copy, moved after every update and used for prediction and
    validation (``inference_key``); :meth:`views`, :meth:`teacher_forward` and
    :meth:`labelled_mask` for the subclass's ``training_step`` (see the module's docstring)."""

    Options = MeanTeacherOptions
    inference_key = "teacher"

    def build_student(self) -> nn.Module:
        """The student network (the recipe's model, as the base trainer builds it)."""
        return super().build_models()["model"]

    def build_models(self) -> dict[str, nn.Module]:
        student = self.build_student()
        return {"model": student, "teacher": frozen_copy(student)}

    def before_training(self, start_step: int) -> None:
        """A fresh run starts the teacher as the student (``init_from`` loads the student only)."""
        if start_step == 0:
            self.teacher.load_state_dict(self.student.state_dict())

    @property
    def student(self) -> nn.Module:
        return unwrap(self.models["model"])

    @property
    def teacher(self) -> nn.Module:
        return self.models["teacher"]

    def after_update(self, step: int) -> None:
        """The teacher's EMA update after optimisation step ``step``."""
        update_teacher(self.teacher, self.student, step, self.options.ema_decay, self.options.ema_buffers)

    def view_seed(self, step: int, which: int) -> int:
        """Seed of view ``which`` (0 student, 1 teacher) at ``step``: distinct per rank, so the
        processes of a DDP run perturb their own samples independently."""
        return ((self.recipe.trainer.seed * 1_000_003 + step) * 4 + which) * 1024 + self.dist.rank

    def views(self, image: torch.Tensor, step: int) -> tuple[View, View]:
        """Independently perturbed (student, teacher) views of ``image``."""
        cfg = self.options.perturb
        return make_view(image, cfg, self.view_seed(step, 0)), make_view(image, cfg, self.view_seed(step, 1))

    def teacher_forward(self, *args, **kwargs):
        """The teacher's output for these inputs, without gradient, in train mode unless
        configured otherwise (its mode is restored afterwards)."""
        mode = train_mode if self.options.teacher_train_mode else eval_mode
        with mode(self.teacher), torch.no_grad():
            return self.teacher(*args, **kwargs)

    @staticmethod
    def labelled_mask(batch: dict) -> torch.Tensor:
        """``(B,)`` bool: the samples of the labelled stream."""
        return batch["labelled"].to(torch.bool)


__all__ = ["MeanTeacherOptions", "MeanTeacherTrainer", "teacher_decay"]
