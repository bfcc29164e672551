"""PCRL pretraining (PCRL, ICCV 2021; ``docs/methods/pcrl.md``): the published step (``pytorch/pcrl_3d.py``,
``train_rep_C2L``) with InfoNCE in place of its NCE criterion.

One step, on a batch of the pretext data (:mod:`medvol.data.pretext`: distorted inputs ``x1``,
``x2``; their transformed copies ``t1``, ``t2`` with indicators ``a1``, ``a2``; the clean views
``g1``, ``g2``):
0. the momentum encoder follows the student, ``theta_k = m theta_k + (1 - m) theta_q``
   (parameters only; it gets no gradient, its BatchNorm statistics come from its own passes);
1. it embeds ``x2`` with *shuffled BatchNorm* (no grad) -> key ``k`` and its features: a key
   never shares BN statistics with the batch its query was normalised with. Under DDP the
   shuffle is across ranks, as in MoCo: the global batch is all-gathered, permuted alike on
   every rank, each rank embeds its share, and the outputs (the key *and* its multi-scale
   feature maps, which the hybrid decoder needs) go back to the ranks that own the samples;
   SyncBN is not used. On one process the permuted batch is split into ``key_bn_groups``
   groups that normalise apart;
2. the student embeds ``x1`` -> query ``q`` (projection of the ungated bottleneck); one
   attention MLP gates its bottleneck with ``a1`` and the momentum bottleneck with ``a2``; the
   hybrid ``alpha1 * student + (1 - alpha1) * momentum`` (bottleneck and every skip) decodes to
   ``out_alpha``, the student's own gated features to ``out``;
3. batch mixup (one permutation, ``lam``): ``x1``, ``x2``, ``g1``, ``g2`` and ``k_mix = mix(k)``;
   the momentum encoder embeds mixed ``x2`` -> ``k~`` and features; the student runs mixed
   ``x1`` with those and a new ``alpha2``, *without* gating -> ``q~``, ``out~_alpha``, ``out~``
   (both student passes are one ``forward`` call, as DDP wants);
4. contrast = mean of InfoNCE (q, k), (q~, k~), (q~, k_mix) against the queue (temperature T);
   recon = mean of MSE (out, t1), (out~, mix g1), (out_alpha, alpha1 t1 + (1 - alpha1) t2),
   (out~_alpha, alpha2 mix g1 + (1 - alpha2) mix g2) (:func:`pcrl_loss_terms`);
   loss = contrast_weight * contrast + recon_weight * recon;
5. after the update, the three keys k, k~, k_mix are written into the queue in that order
   (under DDP each write holds all ranks' keys). All three terms contrast against the queue
   as it stood before the step (the published memory writes each key right after its own
   term, so its later terms meet this step's earlier keys among their negatives).
The run writes ``encoder.pt`` (the student encoder's tensors, named as in ``pcrl_unet``) at
every checkpoint and at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks import eval_mode

from medvol.checkpoint import save_checkpoint
from medvol.data.dataset import StepDataset
from medvol.data.pretext import PretextConfig, PretextDataset
from medvol.errors import ConfigError
from medvol.losses.contrastive import KeyQueue, info_nce
from medvol.networks.pcrl import KeyEncoder, PCRLNet
from medvol.training import register_trainer
from medvol.training.ema import ema_update
from medvol.training.engine import Trainer, unwrap
from medvol.training.sources import PretextVolumes

ENCODER_FORMAT = "medvol-encoder-1"


@dataclass
class PCRLOptions:
    """The recipe's ``method`` section for PCRL pretraining: the momentum encoder's decay, the
    InfoNCE temperature and queue, the projection and attention heads' sizes, the shuffled-BN
    groups, the weights of the contrast and reconstruction terms, the validation samples, the
    queue warm-up, and the pretext crops and distortions (:class:`PretextConfig`)."""

    momentum: float = 0.999
    temperature: float = 0.2
    queue_size: int = 16384
    proj_dim: int = 128
    proj_hidden: int = 128
    attention_hidden: int = 256
    key_bn_groups: int = 2  # one process: shuffled-BN groups of the momentum encoder's batch (DDP: ranks)
    contrast_weight: float = 1.0
    recon_weight: float = 1.0
    val_samples: int = 16  # fixed pretext samples of the validation scans (retrieval chance: 1 / val_samples)
    queue_warmup: bool = True  # fill the queue with real keys before step 0 (else: random unit vectors)
    pretext: PretextConfig = field(default_factory=PretextConfig)


def retrieval_accuracy(q: torch.Tensor, k: torch.Tensor) -> float:
    """Share of queries whose own key (row i of ``k``) is their most similar key; a query tied
    with t keys at the top counts 1/t, so a constant encoder scores exactly chance (1/n)."""
    s = q @ k.t()
    own = s.diagonal()[:, None]
    better, ties = (s > own).sum(1), (s == own).sum(1)
    return float(torch.where(better == 0, 1.0 / ties, torch.zeros_like(own[:, 0])).mean())


def shuffled_forward(net: nn.Module, x: torch.Tensor, groups: int, generator: torch.Generator
                     ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``net(x)`` with the batch permuted and split into ``groups`` BatchNorm groups, outputs
    returned in the original order."""
    b = x.shape[0]
    perm = torch.randperm(b, generator=generator).to(x.device)
    inv = torch.argsort(perm)
    outs = [net(chunk) for chunk in x[perm].chunk(max(1, min(groups, b)))]
    feats = [torch.cat([o[0][i] for o in outs])[inv] for i in range(len(outs[0][0]))]
    return feats, torch.cat([o[1] for o in outs])[inv]


def _all_gather(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as tdist

    parts = [torch.empty_like(t) for _ in range(tdist.get_world_size())]
    tdist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def cross_rank_shuffled_forward(net: nn.Module, x: torch.Tensor, generator: torch.Generator
                                ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """MoCo's shuffled BN across ranks: each rank embeds a random share of the global batch
    (``generator`` must be seeded alike on every rank); returns this rank's own samples."""
    import torch.distributed as tdist

    b, rank = x.shape[0], tdist.get_rank()
    x_all = _all_gather(x)
    perm = torch.randperm(x_all.shape[0], generator=generator).to(x.device)
    feats, k = net(x_all[perm[rank * b:(rank + 1) * b]])
    own = torch.argsort(perm)[rank * b:(rank + 1) * b]  # where this rank's samples sit in perm order
    return [_all_gather(f)[own] for f in feats], _all_gather(k)[own]


@dataclass
class MixDraw:
    """A step's batch-level draws, one set per (per-process) batch as the published loop draws
    them: the hybrid weights ``alpha1`` (gated pass) and ``alpha2`` (mixup pass), and the
    batch mixup's ``lam`` and permutation ``perm``; each weight max(b, 1 - b), b ~ Beta(1, 1)."""

    alpha1: float
    alpha2: float
    lam: float
    perm: torch.Tensor

    def mix(self, t: torch.Tensor) -> torch.Tensor:
        """Batch mixup (published ``mixup_data``): ``lam * t + (1 - lam) * t[perm]``."""
        return self.lam * t + (1 - self.lam) * t[self.perm]


def draw_mix(seed: int, step: int, rank: int, batch: int, device: torch.device | str = "cpu") -> MixDraw:
    rng = np.random.default_rng([seed, step, rank, 0x6D6978])
    alpha1, alpha2, lam = (max(b, 1.0 - b) for b in rng.beta(1.0, 1.0, 3).tolist())
    return MixDraw(alpha1, alpha2, lam, torch.from_numpy(rng.permutation(batch)).to(device))


def pcrl_loss_terms(out: dict[str, torch.Tensor], k: torch.Tensor, k_tilde: torch.Tensor, batch: dict,
                    draw: MixDraw, negatives: torch.Tensor, temperature: float) -> dict[str, torch.Tensor]:
    """The published objective (``pytorch/pcrl_3d.py``, ``train_rep_C2L``), term by term, from the
    student's outputs ``out`` (:meth:`PCRLNet.forward`), the raw keys ``k`` of ``x2`` and
    ``k_tilde`` of the mixed ``x2``, and the queue's keys as negatives:

    - contrast = mean of InfoNCE(q, k), InfoNCE(q~, k~), InfoNCE(q~, k_mix), k_mix the batch
      mixup of the raw keys (``out``, ``out2``, ``out3`` there), every vector L2-normalised;
    - recon = mean of MSE(out, t1), MSE(out~, mix(g1)), MSE(out_alpha, alpha1 t1 + (1 - alpha1) t2),
      MSE(out~_alpha, alpha2 mix(g1) + (1 - alpha2) mix(g2)) (``mg_loss`` there);

    also ``keys``: the three keys the step writes into the queue, in order, ``(3, B, D)``."""
    q, q_mix = F.normalize(out["q"].float(), dim=1), F.normalize(out["q_mix"].float(), dim=1)
    keys = torch.stack([F.normalize(v.float(), dim=1) for v in (k, k_tilde, draw.mix(k.float()))]).detach()
    c_qk, acc = info_nce(q, keys[0], negatives, temperature)
    c_mix, _ = info_nce(q_mix, keys[1], negatives, temperature)
    c_kmix, _ = info_nce(q_mix, keys[2], negatives, temperature)
    t1, t2 = batch["t1"], batch["t2"]
    g1, g2 = draw.mix(batch["g1"]), draw.mix(batch["g2"])
    a1, a2 = draw.alpha1, draw.alpha2
    r_out = F.mse_loss(out["out"].float(), t1)
    r_mix = F.mse_loss(out["out_mix"].float(), g1)
    r_alpha = F.mse_loss(out["out_alpha"].float(), a1 * t1 + (1 - a1) * t2)
    r_alpha_mix = F.mse_loss(out["out_alpha_mix"].float(), a2 * g1 + (1 - a2) * g2)
    return {"contrast": (c_qk + c_mix + c_kmix) / 3, "recon": (r_out + r_mix + r_alpha + r_alpha_mix) / 4,
            "contrast_qk": c_qk, "contrast_mix": c_mix, "contrast_kmix": c_kmix, "recon_out": r_out,
            "recon_mix": r_mix, "recon_alpha": r_alpha, "recon_alpha_mix": r_alpha_mix, "key_acc": acc, "keys": keys}


@register_trainer
class PCRLTrainer(Trainer):
    """PCRL pretraining (``trainer.name: pcrl``, model ``pcrl``): the published step on pretext
    pairs of unlabelled volumes (:class:`PretextVolumes`, a cache or any folder of scans),
    validated by reconstruction MSE and key retrieval on fixed samples of the validation scans;
    writes ``encoder.pt`` for fine-tuning with ``pcrl_unet``."""

    name = "pcrl"
    requires_model = "pcrl"
    Options = PCRLOptions
    primary_metric = "val/recon_mse"
    higher_is_better = False
    scan_validation = False  # pretraining: no segmentation output to validate

    source: PretextVolumes
    _val_batch: dict | None = None  # the fixed validation samples, drawn on first use

    # ------------------------------------------------------------------ data
    def make_source(self) -> PretextVolumes:
        source = PretextVolumes.from_recipe(self.cache_dir, self.run_dir, self.recipe, self.options.pretext, self.dist,
                                            default_patch=[64, 64, 32], default_batch=16)
        if any(p % 8 for p in source.patch_size):
            raise ConfigError(f"data.patch_size {source.patch_size}: PCRL's U-Net pools three times; use multiples "
                              "of 8")
        return source

    def pretext_dataset(self, cases: list[str], global_batch: int, seed: int) -> PretextDataset:
        """Pretext samples of ``cases`` of the source."""
        src = self.source
        return PretextDataset(src.root, cases, src.volumes, src.patch_size, self.options.pretext, global_batch, seed)

    @property
    def queue(self) -> KeyQueue:
        q = self.models["queue"]
        assert isinstance(q, KeyQueue)
        return q

    @property
    def student(self) -> PCRLNet:
        s = unwrap(self.models["model"])
        assert isinstance(s, PCRLNet)
        return s

    def make_dataset(self) -> StepDataset:
        return self.pretext_dataset(self.source.labelled, self.global_batch, self.recipe.trainer.seed)

    # ------------------------------------------------------------------ models
    def build_models(self) -> dict[str, nn.Module]:
        o, base = self.options, self.recipe.model.base_features
        student = PCRLNet(self.in_channels, base, o.proj_dim, o.proj_hidden, o.attention_hidden)
        key = KeyEncoder(self.in_channels, base, o.proj_dim, o.proj_hidden)
        shared = ("encoder", "projector")
        key.load_state_dict({k: v for k, v in student.state_dict().items() if k.split(".")[0] in shared})
        key.requires_grad_(False)
        gen = torch.Generator().manual_seed(self.recipe.trainer.seed)
        return {"model": student, "momentum": key, "queue": KeyQueue(o.proj_dim, o.queue_size, generator=gen)}

    # ------------------------------------------------------------------ step
    def _key_generator(self, step: int) -> torch.Generator:
        """The same on every rank (the cross-rank permutation must agree)."""
        return torch.Generator().manual_seed((self.recipe.trainer.seed * 1_000_003 + step * 97) % 2**63)

    def _keys(self, x2: torch.Tensor, generator: torch.Generator) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The momentum encoder's features and raw key of ``x2``, with shuffled BatchNorm."""
        if self.dist.distributed:
            return cross_rank_shuffled_forward(self.models["momentum"], x2, generator)
        return shuffled_forward(self.models["momentum"], x2, self.options.key_bn_groups, generator)

    def training_step(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        o = self.options
        student = self.models["model"]
        draw = draw_mix(self.recipe.trainer.seed, step, self.dist.rank, batch["x1"].shape[0], batch["x1"].device)
        with torch.no_grad():
            ema_update(self.models["momentum"], unwrap(student), o.momentum, buffers=False)
            gen = self._key_generator(step)
            key_feats, k = self._keys(batch["x2"], gen)  # step 1
            key_feats_mix, k_tilde = self._keys(draw.mix(batch["x2"]), gen)  # step 3
        out = student(batch["x1"], key_feats, batch["a1"], batch["a2"], draw.alpha1,  # steps 2 and 3
                      draw.mix(batch["x1"]), key_feats_mix, draw.alpha2)
        terms = pcrl_loss_terms(out, k, k_tilde, batch, draw, self.queue.keys, o.temperature)
        self._pending_keys = terms.pop("keys")
        terms["loss"] = o.contrast_weight * terms["contrast"] + o.recon_weight * terms["recon"]
        return terms

    def after_update(self, step: int) -> None:
        """Step 5: the step's keys into the queue (the momentum encoder moved at the step's start,
        step 0, as published)."""
        self._enqueue_pending()

    def _enqueue_pending(self) -> None:
        """Writes the step's keys into the queue, ``(n_writes, B, D)`` in write order; under DDP
        each write holds the keys of every rank, in rank order (identical queues)."""
        keys = self._pending_keys
        if self.dist.distributed:
            import torch.distributed as tdist

            parts = [torch.empty_like(keys) for _ in range(self.dist.world_size)]
            tdist.all_gather(parts, keys.contiguous())
            keys = torch.stack(parts, 1)  # (n_writes, world, B, D)
        for write in keys.reshape(keys.shape[0], -1, keys.shape[-1]):
            self.queue.enqueue(write)

    @torch.no_grad()
    def before_training(self, start_step: int) -> None:
        """Queue warm-up: before the first step, the momentum encoder embeds ``queue_size``
        pretext views (their own seed, not the training stream's) so that the first steps
        contrast against real keys, not random vectors."""
        from medvol.data import make_loader

        queue = self.queue
        if start_step or not self.options.queue_warmup:
            return
        n_steps = -(-queue.size // self.global_batch)
        ds = self.pretext_dataset(self.source.labelled, self.global_batch, self.recipe.trainer.seed + 104729)
        loader = make_loader(ds, 0, n_steps, self.batch_size, self.dist.rank, self.dist.world_size,
                             self.recipe.data.num_workers)
        for step, batch in enumerate(loader):
            with self.autocast():
                _, k = self._keys(batch["x2"].to(self.device), self._key_generator(-1 - step))
            self._pending_keys = F.normalize(k.float(), dim=1)[None]
            self._enqueue_pending()

    # ------------------------------------------------------------------ validation / export
    def _validation_batch(self) -> dict:
        if self._val_batch is None:
            n = self.options.val_samples
            ds = self.pretext_dataset(self.source.val_cases, n, self.recipe.trainer.seed + 7919)
            samples = [ds.item(0, i) for i in range(n)]
            self._val_batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
        return self._val_batch

    def validate(self) -> dict[str, float]:
        """On fixed pretext samples of the validation scans: ordinary-path reconstruction MSE, key
        retrieval accuracy (each query's nearest key among the validation keys is its own) and
        the spread of the queries (mean per-dimension std; near 0 = collapsed embeddings)."""
        if not self.source.val_cases:
            return {}
        student, key = self.student, self.models["momentum"]
        batch = self._validation_batch()
        se, qs, ks = 0.0, [], []
        with eval_mode(student, key):
            for i in range(0, batch["x1"].shape[0], self.batch_size):
                b = {k: v[i:i + self.batch_size].to(self.device) for k, v in batch.items()}
                with self.autocast():
                    _, k = key(b["x2"])
                    feats, q = student.encode(b["x1"])
                    out = student.decode(student.gate(feats, b["a1"]))
                se += float(F.mse_loss(out.float(), b["t1"], reduction="sum"))
                qs.append(F.normalize(q.float(), dim=1))
                ks.append(F.normalize(k.float(), dim=1))
        q, k = torch.cat(qs), torch.cat(ks)
        return {"val/recon_mse": se / batch["t1"].numel(), "val/retrieval_acc": retrieval_accuracy(q, k),
                "val/retrieval_chance": 1.0 / q.shape[0], "val/embedding_std": float(q.std(0).mean())}

    def export(self) -> None:
        enc = self.student.encoder
        save_checkpoint(self.run_dir / "encoder.pt", {
            "format": ENCODER_FORMAT, "step": self.current_step + 1,
            "encoder": {f"encoder.{k}": v.detach().cpu() for k, v in enc.state_dict().items()},
            "in_channels": self.in_channels, "base_features": self.recipe.model.base_features,
            "model": "pcrl_unet",
        })
