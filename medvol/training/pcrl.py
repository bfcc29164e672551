"""PCRL pretraining (METHODS.md §3): contrastive learning against a queue of momentum keys plus
reconstruction of diverse contexts (ordinary, momentum and hybrid), with the decoder
conditioned on the indicated transform of its target.

One step:
1. the momentum encoder follows the student, ``theta_k = m theta_k + (1 - m) theta_q``
   (parameters only; it gets no gradient, its BatchNorm statistics come from its own passes);
2. it embeds the second views ``x2`` with *shuffled BatchNorm*, so that a key never shares
   its BN statistics with the batch its query was normalised with. Under DDP the shuffle is
   across ranks, as in MoCo: the global batch of ``x2`` is all-gathered, permuted with a
   permutation every rank draws alike, each rank embeds its share, and the outputs (the key
   *and* its multi-scale feature maps, which the hybrid path and the momentum reconstruction
   need) are all-gathered back to the ranks that own the samples; SyncBN is not used. On one
   process the permuted batch is split into ``key_bn_groups`` groups that normalise apart;
3. the student embeds ``x1`` (query ``q``), mixes its features with the key's at every skip and
   the bottleneck with the sample's ``alpha`` (hybrid embedding ``z_h``) and decodes the three
   feature sets, each gated by the indicator of its target's transform;
4. loss = contrast_weight * (InfoNCE(q, k) + InfoNCE(q, z_h)) / 2
        + recon_weight * (MSE(rec_o, T_o g1) + MSE(rec_m, T_m g2) + MSE(rec_h, T_h mix)) / 3,
   InfoNCE against the queue at temperature T; after the update the keys (all ranks') are
   enqueued.
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
from medvol.data.dataset import StepDataset, split_cases
from medvol.data.pretext import PretextConfig, PretextDataset, prepare_scan_folder
from medvol.errors import ConfigError
from medvol.losses.contrastive import KeyQueue, info_nce
from medvol.networks.pcrl import KeyEncoder, PCRLNet
from medvol.plans import Plans
from medvol.training import register_trainer
from medvol.training.distributed import barrier
from medvol.training.engine import Trainer, unwrap
from medvol.training.schedules import ema_update

ENCODER_FORMAT = "medvol-encoder-1"


@dataclass
class PCRLOptions:
    momentum: float = 0.999
    temperature: float = 0.2
    queue_size: int = 16384
    proj_dim: int = 128
    proj_hidden: int = 128
    attention_hidden: int = 256
    key_bn_groups: int = 2  # one process: shuffled-BN groups of the momentum encoder's batch (DDP: ranks)
    contrast_weight: float = 1.0
    recon_weight: float = 1.0
    val_samples: int = 16  # fixed pretext samples of the validation scans
    queue_warmup: bool = True  # fill the queue with real keys before step 0 (else: random unit vectors)
    pretext: PretextConfig = field(default_factory=PretextConfig)


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


@register_trainer
class PCRLTrainer(Trainer):
    name = "pcrl"
    Options = PCRLOptions
    primary_metric = "val/recon_mse"
    higher_is_better = False
    scan_validation = False  # pretraining: no segmentation output to validate

    # ------------------------------------------------------------------ data
    def setup_data(self) -> None:
        d, o = self.recipe.data, self.options
        if self.recipe.model.name != "pcrl":
            raise ConfigError(f"trainer 'pcrl' needs model.name pcrl, got '{self.recipe.model.name}'")
        if (self.cache_dir / "plans.json").exists():
            from medvol.cache import list_cases, load_plans

            self.kind, self.source_root = "cache", self.cache_dir
            self.plans = Plans.from_dict(load_plans(self.cache_dir))
            cases = list_cases(self.cache_dir)
            self.in_channels = self.plans.num_channels
        else:  # any folder of scans, converted once into the run folder
            from medvol.utils import read_json

            self.kind, self.source_root, self.plans = "folder", self.run_dir / "pretext_volumes", None
            if self.dist.is_main:
                prepare_scan_folder(self.cache_dir, self.source_root, o.pretext, quiet=False)
            barrier(self.dist)
            cases = sorted(read_json(self.source_root / "manifest.json")["scans"])
            self.in_channels = int(np.load(self.source_root / f"{cases[0]}.npy", mmap_mode="r").shape[0])
        if not cases:
            raise ConfigError(f"{self.cache_dir}: no scans to pretrain on")
        self.num_classes = 0  # no segmentation output
        self.patch_size = list(d.patch_size or [64, 64, 32])
        self.batch_size = int(d.batch_size or 16)
        train, self.val_cases = split_cases(cases, d.val_fraction, d.val_cases, self.recipe.trainer.seed)
        self.labelled, self.unlabelled = train, []  # labels, where the cache has them, are never read
        if not train:
            raise ConfigError(f"{self.cache_dir}: no scan left for pretraining after the validation split")
        if any(p % 8 for p in self.patch_size):
            raise ConfigError(f"data.patch_size {self.patch_size}: PCRL's U-Net pools three times; use multiples of 8")
        self._val_batch: dict | None = None

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
        return PretextDataset(self.source_root, self.labelled, self.kind, self.patch_size, self.options.pretext,
                              self.global_batch, seed=self.recipe.trainer.seed)

    # ------------------------------------------------------------------ models
    def build_models(self) -> dict[str, nn.Module]:
        o, base = self.options, self.recipe.model.base_features
        student = PCRLNet(self.in_channels, base, o.proj_dim, o.proj_hidden, o.attention_hidden)
        key = KeyEncoder(self.in_channels, base, o.proj_dim, o.proj_hidden)
        shared = ("encoder", "projector")
        key.load_state_dict({k: v for k, v in student.state_dict().items() if k.split(".")[0] in shared})
        for p in key.parameters():
            p.requires_grad_(False)
        gen = torch.Generator().manual_seed(self.recipe.trainer.seed)
        return {"model": student, "momentum": key, "queue": KeyQueue(o.proj_dim, o.queue_size, generator=gen)}

    # ------------------------------------------------------------------ step
    def _key_generator(self, step: int) -> torch.Generator:
        """The same on every rank (the cross-rank permutation must agree)."""
        return torch.Generator().manual_seed((self.recipe.trainer.seed * 1_000_003 + step * 97) % 2**63)

    def _keys(self, x2: torch.Tensor, step: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        if self.dist.distributed:
            return cross_rank_shuffled_forward(self.models["momentum"], x2, self._key_generator(step))
        return shuffled_forward(self.models["momentum"], x2, self.options.key_bn_groups, self._key_generator(step))

    def training_step(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        o = self.options
        student, key = self.models["model"], self.models["momentum"]
        with torch.no_grad():
            ema_update(key, unwrap(student), o.momentum, buffers=False)
            key_feats, k = self._keys(batch["x2"], step)
        out = student(batch["x1"], key_feats, batch["ind_o"], batch["ind_m"], batch["ind_h"], batch["alpha"])
        negatives = self.queue.keys
        l_q, acc = info_nce(out["q"], k, negatives, o.temperature)
        l_h, _ = info_nce(out["q"], out["z_h"], negatives, o.temperature)
        contrast = (l_q + l_h) / 2
        rec = {p: F.mse_loss(out[f"rec_{p}"].float(), batch[t]) for p, t in (("o", "t1"), ("m", "t2"), ("h", "th"))}
        recon = (rec["o"] + rec["m"] + rec["h"]) / 3
        self._pending_keys = k.detach()
        return {"loss": o.contrast_weight * contrast + o.recon_weight * recon, "contrast": contrast, "recon": recon,
                "recon_o": rec["o"], "recon_h": rec["h"], "key_acc": acc}

    def optimization_step(self, batch: dict, step: int) -> dict[str, float]:
        losses = super().optimization_step(batch, step)
        self._enqueue_pending()
        return losses

    def _enqueue_pending(self) -> None:
        keys = self._pending_keys
        if self.dist.distributed:  # every rank enqueues the keys of the whole global batch, in rank order
            import torch.distributed as tdist

            parts = [torch.empty_like(keys) for _ in range(self.dist.world_size)]
            tdist.all_gather(parts, keys.contiguous())
            keys = torch.cat(parts)
        self.queue.enqueue(keys)

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
        ds = PretextDataset(self.source_root, self.labelled, self.kind, self.patch_size, self.options.pretext,
                            self.global_batch, seed=self.recipe.trainer.seed + 104729)
        loader = make_loader(ds, 0, n_steps, self.batch_size, self.dist.rank, self.dist.world_size,
                             self.recipe.data.num_workers)
        for step, batch in enumerate(loader):
            with self.autocast():
                _, k = self._keys(batch["x2"].to(self.device), -1 - step)
            self._pending_keys = k.float()
            self._enqueue_pending()

    # ------------------------------------------------------------------ validation / export
    def _validation_batch(self) -> dict:
        if self._val_batch is None:
            n = self.options.val_samples
            ds = PretextDataset(self.source_root, self.val_cases, self.kind, self.patch_size, self.options.pretext,
                                n, seed=self.recipe.trainer.seed + 7919)
            samples = [ds.sample(0, i) for i in range(n)]
            self._val_batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
        return self._val_batch

    def validate(self) -> dict[str, float]:
        """On fixed pretext samples of the validation scans: ordinary-path reconstruction MSE, key
        retrieval accuracy (each query's nearest key among the validation keys is its own) and
        the spread of the queries (mean per-dimension std; near 0 = collapsed embeddings)."""
        if not self.val_cases:
            return {}
        student, key = unwrap(self.models["model"]), self.models["momentum"]
        batch = self._validation_batch()
        se, qs, ks = 0.0, [], []
        with eval_mode(student, key):
            for i in range(0, batch["x1"].shape[0], self.batch_size):
                b = {k: v[i:i + self.batch_size].to(self.device) for k, v in batch.items()}
                with self.autocast():
                    key_feats, k = key(b["x2"])
                    out = student(b["x1"], key_feats, b["ind_o"], b["ind_m"], b["ind_h"], b["alpha"])
                se += float(F.mse_loss(out["rec_o"].float(), b["t1"], reduction="sum"))
                qs.append(out["q"].float())
                ks.append(k.float())
        q, k = torch.cat(qs), torch.cat(ks)
        acc = float(((q @ k.t()).argmax(1) == torch.arange(q.shape[0], device=q.device)).float().mean())
        return {"val/recon_mse": se / batch["t1"].numel(), "val/retrieval_acc": acc,
                "val/embedding_std": float(q.std(0).mean())}

    def export(self) -> None:
        enc = self.student.encoder
        save_checkpoint(self.run_dir / "encoder.pt", {
            "format": ENCODER_FORMAT, "step": self.current_step + 1,
            "encoder": {f"encoder.{k}": v.detach().cpu() for k, v in enc.state_dict().items()},
            "in_channels": self.in_channels, "base_features": self.recipe.model.base_features,
            "model": "pcrl_unet",
        })
