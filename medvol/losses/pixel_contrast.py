"""UGPCL's losses (IJCAI 2022; ``docs/methods/ugpcl.md``): uncertainty-guided pixel contrast
against a per-class memory queue, and the total of the supervised, consistency, rotation and
contrastive terms.

Shapes: logits ``(B, C, H, W)``, integer labels ``(B, H, W)`` (or ``(B, 1, H, W)``) with
``IGNORE`` (-1) for pixels that take no part, embeddings ``(B, D, h, w)`` L2-normalised along D.

As published (the defaults): one anchor per image and class present on more than one cell,
easy first (:func:`sample_anchors_published`); a background "queue" of zero vectors that is never
written (``background_queue="zeros"``); the supervised Dice over the foreground classes with
squared denominators (:class:`PublishedDiceLoss`). The earlier medvol rules stay selectable
(``anchor_sampling="random"``, ``background_queue="means"``, ``dice="all_classes"``).

Changed from the published code (see ``docs/methods/ugpcl.md``): the foreground queues are
zero-filled with a fill count and unfilled slots are masked out (the published ones start from
random vectors that act as positives and negatives); the pointer advances by exactly the number
of entries written; the state lives in buffers, so it is checkpointed.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from medvol.losses.contrastive import KeyQueue
from medvol.losses.dice import BatchDiceLoss, soft_dice
from medvol.ramps import sigmoid_rampup

IGNORE = -1
ANCHOR_SAMPLING = ("published", "random")
BACKGROUND_QUEUE = ("zeros", "means")
DICE = ("published", "all_classes")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got '{value}'")


# ------------------------------------------------------------------ uncertainty


def uncertainty_map(logits_a: torch.Tensor, logits_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy (natural log) of the mean of both decoders' softmaxes, ``(B, H, W)``, and that
    mean probability ``(B, C, H, W)``."""
    mean = 0.5 * (torch.softmax(logits_a.float(), 1) + torch.softmax(logits_b.float(), 1))
    entropy = -(mean * torch.log(mean.clamp_min(1e-12))).sum(1)
    return entropy, mean


def uncertainty_threshold(step: float, rampup_length: float) -> float:
    """``(0.75 + 0.25 * sigmoid_rampup(step, rampup_length)) * ln 2``: from 0.75 ln 2 up to ln 2
    (the paper ramps over the whole training, 10,000 iterations)."""
    return (0.75 + 0.25 * sigmoid_rampup(step, rampup_length)) * math.log(2.0)


@torch.no_grad()
def contrast_labels(logits_cnn: torch.Tensor, logits_tf: torch.Tensor, threshold: float,
                    labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels for the pixel contrast, ``(B, H, W)``: the first ``len(labels)`` images keep their
    ground truth (as the published trainer does); the others take the argmax of the mean
    softmax, with pixels whose uncertainty exceeds ``threshold`` set to ``IGNORE``. Also
    returns the uncertain mask ``(B, H, W)``."""
    entropy, mean = uncertainty_map(logits_cnn, logits_tf)
    uncertain = entropy > threshold
    out = mean.argmax(1)
    out[uncertain] = IGNORE
    if labels is not None:
        labels = _squeeze(labels)
        out[: labels.shape[0]] = labels.to(out)
    return out, uncertain


def _squeeze(labels: torch.Tensor) -> torch.Tensor:
    return labels[:, 0] if labels.ndim == 4 else labels


def labels_on_grid(labels: torch.Tensor, size) -> torch.Tensor:
    """Nearest-neighbour labels on the embedding grid (stride 8: pixel (8i, 8j) for cell (i, j)).
    A cell is as certain as the pixel it takes its label from."""
    labels = _squeeze(labels)
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


# ------------------------------------------------------------------ memory queue


class ClassMemoryQueue(nn.Module):
    """One FIFO queue of ``size`` L2-normalised ``dim``-wide entries per class (UGPCL: 500
    class-mean embeddings per class), each a :class:`~medvol.losses.contrastive.KeyQueue`.

    Slots start at zero and count as empty until written; :meth:`valid_mask` says which are
    filled, so an empty slot never enters the loss. State (entries, pointer, count) is in
    buffers: it travels with ``state_dict``.
    """

    def __init__(self, num_classes: int, dim: int = 256, size: int = 500):
        super().__init__()
        self.queues = nn.ModuleList(KeyQueue(dim, size, generator=torch.Generator().manual_seed(0))
                                    for _ in range(num_classes))
        for q in self._all():
            q.keys.zero_()

    @property
    def num_classes(self) -> int:
        return len(self.queues)

    def _queue(self, c: int) -> KeyQueue:
        return cast(KeyQueue, self.queues[c])

    def _all(self) -> list[KeyQueue]:
        return [cast(KeyQueue, q) for q in self.queues]

    @property
    def size(self) -> int:
        return self._queue(0).size

    def filled(self, c: int) -> int:
        return int(min(int(self._queue(c).count), self.size))

    def bank(self) -> torch.Tensor:
        """All slots, ``(C, size, dim)``."""
        return torch.stack([q.keys for q in self._all()])

    def valid_mask(self) -> torch.Tensor:
        """``(C, size)``: True where a slot holds a written entry (slots fill from 0 upwards)."""
        slots = torch.arange(self.size, device=self._queue(0).keys.device)
        counts = torch.stack([q.count for q in self._all()]).clamp(max=self.size)
        return slots[None] < counts[:, None]

    def ordered(self, c: int) -> torch.Tensor:
        """Class ``c``'s written entries, oldest first."""
        n = self.filled(c)
        return self._queue(c).ordered()[self.size - n:] if n else self._queue(c).keys[:0]

    @torch.no_grad()
    def enqueue(self, c: int, keys: torch.Tensor) -> None:
        """Append ``keys`` (n, dim) to class ``c``; the pointer advances by n (mod size)."""
        if keys.shape[0]:
            self._queue(c).enqueue(keys)

    @torch.no_grad()
    def enqueue_class_means(self, proj: torch.Tensor, grid_labels: torch.Tensor, across_ranks: bool = True,
                            skip_background: bool = False) -> list[int]:
        """For every image and every class present in it (``grid_labels`` ``(B, h, w)`` on the
        embedding grid, ``IGNORE`` excluded), enqueue the L2-normalised mean embedding of that
        class's cells; per class rank 0's images first, then rank 1's... (image order within a
        rank). With ``skip_background`` class 0 is never written (the published rule: its
        queue stays zero vectors). Returns the number written per class.

        With ``across_ranks`` and a torch.distributed group of several processes, the means of
        every rank are all-gathered first, so every rank writes the same entries and the queues
        stay identical (a collective: every rank must call this at the same step)."""
        means, present = class_means(proj, grid_labels, self.num_classes)
        per_rank = all_gather_class_means(means, present) if across_ranks else ([means], [present])
        per_class = merge_rank_means(*per_rank)
        if skip_background:
            per_class[0] = per_class[0][:0]
        for c, keys in enumerate(per_class):
            self.enqueue(c, keys)
        return [int(k.shape[0]) for k in per_class]

    def contrast_bank(self, background: str = "means") -> tuple[torch.Tensor, torch.Tensor]:
        """The bank ``(C, size, dim)`` and valid mask ``(C, size)`` the contrast sees. With
        ``background="zeros"`` (published) class 0's rows are ``size`` zero vectors, all valid:
        positives of background anchors, negatives (``e^0 = 1`` each) of every other anchor."""
        _check_choice("background_queue", background, BACKGROUND_QUEUE)
        bank, valid = self.bank(), self.valid_mask()
        if background == "zeros":
            bank, valid = bank.clone(), valid.clone()
            bank[0], valid[0] = 0.0, True
        return bank, valid


@torch.no_grad()
def class_means(proj: torch.Tensor, grid_labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, C, D)``: image b's L2-normalised mean embedding of the cells of class c (zeros
    where absent), and ``(B, C)`` bool: class c present in image b (``IGNORE`` cells excluded)."""
    lab = grid_labels.long()
    onehot = F.one_hot(lab.clamp_min(0), num_classes).float() * (lab >= 0)[..., None].float()  # (B, h, w, C)
    sums = torch.einsum("bdhw,bhwc->bcd", proj.detach().float(), onehot)
    counts = onehot.sum((1, 2))  # (B, C)
    return F.normalize(sums / counts.clamp_min(1)[..., None], dim=2), counts > 0


def all_gather_class_means(means: torch.Tensor, present: torch.Tensor
                           ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every rank's :func:`class_means` output, in rank order (``[means]``, ``[present]``
    outside a multi-process group). Needs the same batch size on every rank, as DDP gives."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [means], [present]
    n = dist.get_world_size()
    all_means = [torch.empty_like(means) for _ in range(n)]
    all_present = [torch.empty_like(present, dtype=torch.uint8) for _ in range(n)]  # gloo/NCCL: no bool
    dist.all_gather(all_means, means.contiguous())
    dist.all_gather(all_present, present.to(torch.uint8).contiguous())
    return all_means, [p.bool() for p in all_present]


def merge_rank_means(means: list[torch.Tensor], present: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per class, the entries to enqueue ``(n_c, D)``: the present means of rank 0's images in
    image order, then rank 1's, ... (``means[r]`` ``(B, C, D)``, ``present[r]`` ``(B, C)``).
    Every rank merging the same gathered lists writes the same queue."""
    m, p = torch.cat(means), torch.cat(present)
    return [m[p[:, c], c] for c in range(m.shape[1])]


# ------------------------------------------------------------------ contrastive loss


def sample_anchors_published(proj: torch.Tensor, grid_labels: torch.Tensor, grid_pred: torch.Tensor,
                             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The published sampler (``max_views`` 1): per image and per class that holds more than
    one cell of ``grid_labels`` (``IGNORE`` excluded), one anchor, drawn at random among the
    class's *easy* cells (``grid_pred``, the CNN decoder's argmax on the grid, agrees) when
    there is one, else among its *hard* cells (the prediction disagrees). Image by image,
    classes in ascending order. Returns anchors ``(N, D)`` (with gradients) and their classes
    ``(N,)``."""
    b, d = proj.shape[:2]
    flat = proj.permute(0, 2, 3, 1).reshape(-1, d)
    lab, pred = grid_labels.reshape(b, -1), grid_pred.reshape(b, -1).to(grid_labels.device)
    cells = lab.shape[1]
    rows: list[torch.Tensor] = []
    classes: list[int] = []
    for i in range(b):
        for c in torch.unique(lab[i][lab[i] >= 0]).tolist():
            member = lab[i] == c
            if int(member.sum()) <= 1:
                continue
            easy = torch.nonzero(member & (pred[i] == c)).flatten()
            pool = easy if easy.numel() else torch.nonzero(member).flatten()  # then every cell is hard
            k = int(torch.randint(pool.numel(), (1,), generator=generator))
            rows.append(pool[k] + i * cells)
            classes.append(int(c))
    if not rows:
        return flat[:0], lab.reshape(-1)[:0]
    return flat[torch.stack(rows)], torch.tensor(classes, dtype=lab.dtype, device=lab.device)


def sample_anchors(proj: torch.Tensor, grid_labels: torch.Tensor, max_per_class: int,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """medvol's earlier sampler (``anchor_sampling="random"``): up to ``max_per_class`` cells of
    each class, drawn at random from the whole batch among cells whose label is not
    ``IGNORE``. Returns anchors ``(N, D)`` (with gradients) and their classes ``(N,)``."""
    d = proj.shape[1]
    flat = proj.permute(0, 2, 3, 1).reshape(-1, d)
    lab = grid_labels.reshape(-1)
    picks = []
    for c in torch.unique(lab[lab >= 0]).tolist():
        idx = torch.nonzero(lab == c).flatten()
        if idx.numel() > max_per_class:
            order = torch.randperm(idx.numel(), generator=generator, device="cpu").to(idx.device)
            idx = idx[order[:max_per_class]]
        picks.append(idx)
    if not picks:
        return flat[:0], lab[:0]
    idx = torch.cat(picks)
    return flat[idx], lab[idx]


def queue_info_nce(anchors: torch.Tensor, anchor_classes: torch.Tensor, bank: torch.Tensor,
                   valid: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Supervised InfoNCE of anchors against a per-class memory.

    For anchor a of class c, positives P = the filled entries of class c, negatives N = the
    filled entries of every other class; the loss is
    ``mean_a mean_{p in P} -log(exp(a.p/T) / (exp(a.p/T) + sum_{n in N} exp(a.n/T)))``.
    Anchors with no positive or no negative are left out; with none left the loss is a zero
    that keeps the graph. (With one positive this is :func:`medvol.losses.contrastive.info_nce`;
    that one takes a single positive and shared negatives, so it cannot serve many positives
    and class-dependent negatives without copying the anchors once per positive.)

    ``bank`` ``(C, K, D)``, ``valid`` ``(C, K)`` bool: unfilled slots are never used.
    """
    C = bank.shape[0]
    same = anchor_classes[:, None] == torch.arange(C, device=anchors.device)[None]  # (N, C)
    n_valid = valid.sum(1)  # (C,)
    has_pos = (same * n_valid[None]).sum(1) > 0
    has_neg = ((~same) * n_valid[None]).sum(1) > 0
    keep = has_pos & has_neg
    if not bool(keep.any()):
        return anchors.sum() * 0.0
    a, same = anchors[keep].float(), same[keep]
    logits = torch.einsum("nd,ckd->nck", a, bank.float()) / temperature  # (N, C, K)
    pos_mask = same[:, :, None] & valid[None]
    neg_mask = ~same[:, :, None] & valid[None]
    neg_lse = torch.logsumexp(logits.masked_fill(~neg_mask, float("-inf")).flatten(1), 1)  # (N,)
    per_pair = torch.logaddexp(logits, neg_lse[:, None, None]) - logits
    per_anchor = (per_pair * pos_mask).flatten(1).sum(1) / pos_mask.flatten(1).sum(1)
    return per_anchor.mean()


class PixelContrastLoss(nn.Module):
    """Anchors taken at the embedding stride (8) from labelled/certain cells, InfoNCE (T = 0.07)
    against a :class:`ClassMemoryQueue`, then the batch's class means are enqueued (after the
    loss, so an image is never its own positive).

    ``anchor_sampling``: ``"published"`` (one per image and class, easy first:
    :func:`sample_anchors_published`; needs ``pred``, the CNN decoder's argmax) or
    ``"random"`` (up to ``max_anchors_per_class`` per class over the batch: :func:`sample_anchors`).
    ``background_queue``: ``"zeros"`` (published: class 0's queue is zero vectors, never
    written) or ``"means"`` (background class means are enqueued like the other classes')."""

    def __init__(self, temperature: float = 0.07, max_anchors_per_class: int = 256,
                 anchor_sampling: str = "published", background_queue: str = "zeros"):
        super().__init__()
        _check_choice("anchor_sampling", anchor_sampling, ANCHOR_SAMPLING)
        _check_choice("background_queue", background_queue, BACKGROUND_QUEUE)
        self.temperature = temperature
        self.max_anchors_per_class = max_anchors_per_class
        self.anchor_sampling, self.background_queue = anchor_sampling, background_queue

    def forward(self, proj: torch.Tensor, labels: torch.Tensor, queue: ClassMemoryQueue,
                update_queue: bool = True, generator: torch.Generator | None = None,
                pred: torch.Tensor | None = None) -> torch.Tensor:
        """``labels`` ``(B, H, W)`` (``IGNORE`` where no part), ``pred`` ``(B, H, W)`` the CNN
        decoder's argmax (published sampling only); both go to the embedding grid by nearest
        neighbour."""
        grid = labels_on_grid(labels, proj.shape[-2:])
        if self.anchor_sampling == "published":
            if pred is None:
                raise ValueError("anchor_sampling 'published' needs pred, the CNN decoder's argmax")
            anchors, classes = sample_anchors_published(proj, grid, labels_on_grid(pred, proj.shape[-2:]), generator)
        else:
            anchors, classes = sample_anchors(proj, grid, self.max_anchors_per_class, generator)
        bank, valid = queue.contrast_bank(self.background_queue)
        loss = queue_info_nce(anchors, classes, bank, valid, self.temperature)
        if update_queue:
            queue.enqueue_class_means(proj, grid, skip_background=self.background_queue == "zeros")
        return loss


# ------------------------------------------------------------------ supervised Dice


class PublishedDiceLoss(nn.Module):
    """The published UGPCL Dice (``DiceLoss_`` with ``class_weight [0, 1, ..., 1]``): per
    foreground class c, ``1 - (2 sum p t + s) / (sum p^2 + sum t^2 + s)`` with p the softmax, t
    the one-hot target and s = 1e-5, sums over the whole batch and space (every DDP rank, as
    :class:`~medvol.losses.dice.BatchDiceLoss` pools); summed over the foreground classes and
    divided by the number of classes, background included in that count (weight 0)."""

    def __init__(self, smooth: float = 1e-5):
        super().__init__()
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, C, ...)``, integer target ``(B, 1, ...)``."""
        return self.from_probs(torch.softmax(logits.float(), 1), target)

    def from_probs(self, prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss on probabilities ``(B, C, ...)``: channel 0 (background) is never read."""
        n = prob.shape[1]
        onehot = F.one_hot(target[:, 0].long(), n).movedim(-1, 1).to(prob.dtype)
        p, t = prob[:, 1:], onehot[:, 1:]
        dice = soft_dice(p, t, [0] + list(range(2, p.ndim)), self.smooth, self.smooth, squared=True)
        return (1 - dice).sum() / n


# ------------------------------------------------------------------ total


class UGPCLLoss(nn.Module):
    """The UGPCL objective for a batch whose first ``len(labels)`` images are labelled:

    - supervised: 0.5 Dice + 0.5 CE on the CNN decoder + ``tf_weight`` (0.4) x the same on the
      Transformer decoder (labelled images); ``dice="published"``: :class:`PublishedDiceLoss`
      (foreground classes, squared denominators), ``"all_classes"``: medvol's earlier batch
      Dice over every class, background included, with linear denominators;
    - consistency: MSE between both decoders' softmaxes on the unlabelled images, weight
      ``consistency`` (0.01) x ``sigmoid_rampup(step, consistency_rampup)``;
    - rotation: CE of the rotation head x ``rotation_weight`` (0.1);
    - from ``contrast_start`` (1000) on, the pixel contrast x ``contrast_weight`` (0.1), with the
      uncertainty threshold ramped over ``threshold_rampup`` (the training length, 10,000);
      ``anchor_sampling`` and ``background_queue`` as in :class:`PixelContrastLoss`.

    Returns a dict of the terms (tensors) and ``total``.
    """

    def __init__(self, tf_weight: float = 0.4, consistency: float = 0.01, consistency_rampup: float = 4000.0,
                 rotation_weight: float = 0.1, contrast_weight: float = 0.1, contrast_start: int = 1000,
                 threshold_rampup: float = 10000.0, temperature: float = 0.07, max_anchors_per_class: int = 256,
                 anchor_sampling: str = "published", background_queue: str = "zeros", dice: str = "published"):
        super().__init__()
        _check_choice("dice", dice, DICE)
        self.tf_weight, self.consistency, self.consistency_rampup = tf_weight, consistency, consistency_rampup
        self.rotation_weight, self.contrast_weight = rotation_weight, contrast_weight
        self.contrast_start = contrast_start
        self.threshold_rampup = threshold_rampup
        self.dice: nn.Module = PublishedDiceLoss() if dice == "published" else BatchDiceLoss(include_background=True)
        self.contrast = PixelContrastLoss(temperature, max_anchors_per_class, anchor_sampling, background_queue)

    def supervised(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        target = _squeeze(labels).long()
        return 0.5 * self.dice(logits, target[:, None]) + 0.5 * F.cross_entropy(logits.float(), target)

    def forward(self, out: dict, labels: torch.Tensor, rot_target: torch.Tensor | None, step: int,
                queue: ClassMemoryQueue | None = None, generator: torch.Generator | None = None) -> dict:
        n_l = labels.shape[0]
        seg_cnn, seg_tf = out["seg_cnn"], out["seg_tf"]
        terms = {"sup_cnn": self.supervised(seg_cnn[:n_l], labels), "sup_tf": self.supervised(seg_tf[:n_l], labels)}
        zero = seg_cnn.sum() * 0.0
        if seg_cnn.shape[0] > n_l:
            diff = torch.softmax(seg_cnn[n_l:].float(), 1) - torch.softmax(seg_tf[n_l:].float(), 1)
            terms["consistency"] = diff.pow(2).mean()
        else:
            terms["consistency"] = zero
        terms["rotation"] = F.cross_entropy(out["rot"].float(), rot_target) if rot_target is not None else zero
        cw = self.consistency * sigmoid_rampup(step, self.consistency_rampup)
        terms["contrast"] = zero
        if step >= self.contrast_start and self.contrast_weight > 0 and queue is not None:
            threshold = uncertainty_threshold(step, self.threshold_rampup)
            lab, uncertain = contrast_labels(seg_cnn, seg_tf, threshold, labels)
            pred = seg_cnn.detach().argmax(1)  # the CNN decoder's prediction: easy / hard anchors
            terms["contrast"] = self.contrast(out["proj"], lab, queue, generator=generator, pred=pred)
            terms["uncertain_fraction"] = uncertain[n_l:].float().mean() if seg_cnn.shape[0] > n_l else zero.detach()
        terms["total"] = (terms["sup_cnn"] + self.tf_weight * terms["sup_tf"] + cw * terms["consistency"]
                          + self.rotation_weight * terms["rotation"] + self.contrast_weight * terms["contrast"])
        terms["consistency_weight"] = torch.tensor(cw)
        return terms
