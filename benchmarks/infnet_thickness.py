"""Why Inf-Net's bone map is too thick (issue 27): train one Inf-Net setting on ``ct_bone`` with
the benchmark's overrides (``methods.INFNET_128``), predict the 16 test slices with ``medvol
predict``'s predictor, and score variants of the map and threshold from the same model (a hook
on the model reads the window it predicts): Dice, precision, recall, area called bone / true.

    python benchmarks/infnet_thickness.py NAME STEPS INPUT_SCALE [override ...]
    python benchmarks/infnet_thickness.py fix352 300 2.75            # = infnet_352's Inf-Net arm, seed 0
    python benchmarks/infnet_thickness.py base256 150 2.0 method.loss_size=input

Writes ``$INFNET_SCREEN_DIR/results/NAME.json`` (default ``bench_infnet_thickness``)."""
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import methods  # noqa: E402

from medvol.inference.api import Predictor  # noqa: E402
from medvol.io import read_volume  # noqa: E402
from medvol.training import load_recipe, train  # noqa: E402

name, steps, scale = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
extra = sys.argv[4:]
W = Path(os.environ.get("INFNET_SCREEN_DIR", "bench_infnet_thickness"))
data = methods.build_data("ct_bone", W, False)
base = [s for s in methods.INFNET_128 if not s.startswith("schedule.milestones")]
sets = [*base, f"model.options.input_scale={scale}", f"schedule.milestones=[{int(0.75 * steps)}]",
        f"trainer.steps={steps}", f"trainer.val_every={steps + 1}", "trainer.final_validation=false",
        "data.val_fraction=0.0", "data.labelled=24", "trainer.seed=0", *extra]
run = W / "runs" / name
t0 = time.time()
if not (run / "train_summary.json").exists():
    train(load_recipe("infnet", sets), data.pre, run, resume="auto", device="cpu", quiet=True)
t_train = time.time() - t0

pred = Predictor(run, device="cpu", checkpoint="latest", tta=False)
model = pred.runs[0].model
captured = []
h = model.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach().clone()))
refs, defaults, inputs, insides = [], [], [], []
for f in sorted(data.images.glob("*_0000.nii.gz")):
    vol = read_volume(f)
    ref = read_volume(data.labels / f.name.replace("_0000", "")).array > 0
    captured.clear()
    segv, probs = pred.predict_volume(vol, return_probabilities=True)
    seg = segv.array > 0
    insides.append(probs[1] > 0)
    refs.append(ref)
    defaults.append(seg)
    inputs.append(captured[0])
h.remove()


def stats(masks):
    masks = [m & i for m, i in zip(masks, insides)]
    tp = sum((m & r).sum() for m, r in zip(masks, refs))
    ps = sum(m.sum() for m in masks)
    rs = sum(r.sum() for r in refs)
    dices = [2 * (m & r).sum() / max(1, m.sum() + r.sum()) for m, r in zip(masks, refs)]
    return {"dice": float(np.mean(dices)), "precision": float(tp / max(ps, 1)), "recall": float(tp / rs),
            "area_ratio": float(ps / rs)}


out = {"name": name, "steps": steps, "scale": scale, "extra": extra, "train_s": t_train,
       "medvol_predict": stats(defaults)}


bn_model = copy.deepcopy(model)


@torch.no_grad()
def maps(x, bn_train=False):
    model.eval()
    if bn_train:
        bn_model.load_state_dict(model.state_dict())
        bn_model.eval()
        for m in bn_model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.train()
        return bn_model(x, all_outputs=True), None
    o = model(x, all_outputs=True)  # at the input's size (logits resized), what predict uses
    ow = model(x, all_outputs=True, at_working_size=True)  # at the working size
    return o, ow


# the captured input is the (1, C, X, Y) window the predictor ran first (one of two on one slice)
variants = {k: [] for k in ["ra2_logit_bilinear", "ra2_bn_train", "s_g", "ra4", "ra3",
                            "ra2_prob_area", "ra2_prob_area_minmax", "ra2_prob_bicubic_aa_minmax", "ra2_minmax"]}
sweep = {t: [] for t in np.round(np.arange(0.3, 0.96, 0.05), 2)}
mean256 = []
for x, ref in zip(inputs, refs):
    o, ow = maps(x)
    ob, _ = maps(x, bn_train=True)

    def to_mask(logit_at_input):
        return (torch.sigmoid(logit_at_input)[0, 0].numpy() >= 0.5)[..., None]

    # (X, Y) order: the model's input is (1, C, X, Y) for slice axis 2
    variants["ra2_logit_bilinear"].append(to_mask(o.ra2))
    variants["ra2_bn_train"].append(to_mask(ob.ra2))
    variants["s_g"].append(to_mask(o.global_map))
    variants["ra4"].append(to_mask(o.ra4))
    variants["ra3"].append(to_mask(o.ra3))
    pw = torch.sigmoid(ow.ra2)
    pa = F.interpolate(pw, size=tuple(x.shape[-2:]), mode="area")[0, 0].numpy()
    variants["ra2_prob_area"].append((pa >= 0.5)[..., None])
    mm = lambda p: (p - p.min()) / (p.max() - p.min() + 1e-8)  # noqa: E731
    variants["ra2_prob_area_minmax"].append((mm(pa) >= 0.5)[..., None])
    pb = F.interpolate(pw, size=tuple(x.shape[-2:]), mode="bicubic", antialias=True, align_corners=False)
    variants["ra2_prob_bicubic_aa_minmax"].append((mm(pb[0, 0].numpy()) >= 0.5)[..., None])
    p_in = torch.sigmoid(o.ra2)[0, 0].numpy()
    variants["ra2_minmax"].append((mm(p_in) >= 0.5)[..., None])
    for t in sweep:
        sweep[t].append((p_in >= t)[..., None])
    r = ref[..., 0]
    pn = mm(p_in)
    mean256.append(float(np.mean([2 * ((pn >= t) & r).sum() / max(1, (pn >= t).sum() + r.sum())
                                  for t in np.linspace(1, 0, 256)])))
out["variants"] = {k: stats(v) for k, v in variants.items()}
out["threshold_sweep"] = {str(t): stats(v)["dice"] for t, v in sweep.items()}
out["mean_dice_256"] = float(np.mean(mean256))
out["true_fraction"] = float(np.mean([r.mean() for r in refs]))
(W / "results").mkdir(exist_ok=True)
(W / "results" / f"{name}.json").write_text(json.dumps(out, indent=1))
print(json.dumps(out, indent=1))
