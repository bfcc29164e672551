"""``medvol <command>``: a thin layer that parses arguments and calls the library.

Errors of the MedvolError family are printed as one line, without a traceback, and the
command exits with status 2; a preprocessing run in which some cases failed exits 1
after listing them (the valid cases are processed all the same). A training (its final
validation included), prediction, export or cv stopped by SIGTERM/SIGUSR1 at a safe point
exits 75 (130 for Ctrl-C) after one line saying what it wrote (:class:`medvol.errors.Stopped`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from medvol import __version__, validation
from medvol.errors import INTERRUPTED_EXIT, ConfigError, MedvolError, Stopped
from medvol.utils import ENVIRONMENT_ERRNOS


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (option and problem), exit status 2 as argparse's own."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _checked(check):
    """An argparse action that stores the value after ``check(value, option)``: options
    are validated where they are parsed, with the library's own checks."""

    class Checked(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            try:
                setattr(namespace, self.dest, check(values, option_string))
            except ConfigError as e:
                parser.error(str(e))

    return Checked


DESCRIPTION = """\
medvol: 3D medical image segmentation with nnU-Net-style preprocessing.

  medvol convert-msd TASK RAW           Decathlon task folder -> nnU-Net v2 raw layout
  medvol check RAW                      verify a raw dataset (nnU-Net's --verify_dataset_integrity)
  medvol preprocess RAW -o PRE          NIfTI/DICOM dataset -> plan + training cache
  medvol recipes                        the built-in recipes and what each is for
  medvol train quickstart --data PRE --out RUN
  medvol predict -m RUN -i SCANS -o OUT predictions in the scans' own geometry
  medvol extract-features RUN_2D --data PRE -o FEATURES   slice features for the subject aggregator
  medvol evaluate --pred OUT --ref LABELS
  medvol cv RUNS/                       cross-validation table of the fold_* runs' validations
  medvol best RUN_A RUN_B -o OUT        best configuration/ensemble and its post-processing
  medvol enhance -m SR_RUN -i SCANS -o OUT   super-resolved scans (SERAN), same field of view
  medvol demo                           the whole pipeline on built-in real data

`medvol COMMAND --help` lists a command's options."""


CONVERT_MSD_EXAMPLES = """\
examples:
  medvol convert-msd Task05_Prostate raw/           -> raw/Dataset005_Prostate (4D images split per channel)
  medvol convert-msd Task05_Prostate raw/ --id 205  -> raw/Dataset205_Prostate
  medvol check raw/Dataset005_Prostate              then verify it before preprocessing"""

CHECK_EXAMPLES = """\
examples:
  medvol check raw/Dataset005_Prostate    every case read; one report of all problems

exit status: 0 when every case is clean, 2 when any problem was found (all of them are listed)."""


TRAIN_EXAMPLES = """\
examples:
  medvol train quickstart --data PRE --out RUN                      3d_fullres (nnU-Net's default)
  medvol train quickstart_lowres --data PRE --out RUN_LOW           3d_lowres: PRE/3d_lowres/ (when planned)
  medvol train quickstart_cascade --data PRE --out RUN_CASCADE --set data.previous_stage=RUN_LOW
                                       3d_cascade_fullres: RUN_LOW's predictions as extra input channels
  medvol train quickstart_cascade --data PRE --out RUN_CASCADE/fold_0 --fold 0 \\
      --set 'data.previous_stage=[RUN_LOW/fold_0, RUN_LOW/fold_1, RUN_LOW/fold_2, RUN_LOW/fold_3, RUN_LOW/fold_4]'
                                       each case's input from the low-res fold that validated on it"""

PREDICT_EXAMPLES = """\
examples:
  medvol predict -m RUN -i SCANS -o OUT
  medvol predict -m RUN_CASCADE -i SCANS -o OUT   a 3d_cascade_fullres run: its low-res run predicts first
                                                  (nnU-Net's -prev_stage_predictions, made for you)"""

PLAN_EXAMPLES = """\
examples:
  medvol plan pre/Dataset002_Kidney                                   nnU-Net's default planner
  medvol plan pre/Dataset002_Kidney --planner resenc-l                a Residual Encoder preset
  medvol plan pre/Dataset002_Kidney --from-plans pre/Dataset001_Liver/plans.json
      the liver dataset's plans for the kidney dataset (nnU-Net's move_plans_between_datasets), to
      fine-tune from a liver run: medvol train quickstart --data pre/Dataset002_Kidney --out runs/kidney \\
          --set init_from=runs/liver/checkpoints/latest.pt   (RUN/init_report.json names what did not load)"""

BEST_EXAMPLES = """\
examples:
  medvol best runs/3d_fullres runs/2d -o runs/best
      scores 3d_fullres, 2d and their ensemble on the folds' validations (foreground-mean Dice), decides
      the post-processing of the best and prints the command, e.g.
      medvol predict -m runs/3d_fullres -i IN -o OUT --checkpoint latest \\
          --postprocessing runs/best/postprocessing.json
  medvol best runs/3d_fullres -o runs/best          one configuration: its post-processing only
  medvol best runs/a runs/b runs/c -o runs/best --no-ensembles

Ensembles average the folds' validation probabilities; folds that did not save them predict their
validation cases once more (--device)."""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logging")
    p.add_argument("--debug", action="store_true", help="print the full traceback of medvol's own errors too")


# Options that several commands take, defined once; help=None prints as argparse's no-help line.
PRECISIONS = ["auto", "fp32", "bf16", "fp16"]
AUTO_PRECISION = ("auto: bf16 on CPUs with native bf16 and on GPUs that support it, fp16 on other GPUs, "
                  "else fp32")


def _add_out(p: argparse.ArgumentParser, help: str | None = None, required: bool = True,
             short: bool = True) -> None:
    p.add_argument(*(("-o", "--out") if short else ("--out",)), type=Path, required=required, help=help)


def _add_device(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument("--device", default="auto", action=_checked(validation.device), help=help)


def _add_workers(p: argparse.ArgumentParser) -> None:
    p.add_argument("-j", "--workers", type=int, default=None, action=_checked(validation.positive_int),
                   help="worker processes (default: the usable CPUs, fewer when memory would not hold them)")


def _add_checkpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best")


def _add_precision(p: argparse.ArgumentParser, default: str | None, help: str) -> None:
    p.add_argument("--precision", choices=PRECISIONS, default=default, help=help)


def _add_cache_options(p: argparse.ArgumentParser, overwrite_help: str | None, shard_help: str,
                       orientation_help: str) -> None:
    """The options `medvol preprocess` and `medvol fingerprint` share (the raw dataset, the cache)."""
    _add_workers(p)
    p.add_argument("--overwrite", action="store_true", help=overwrite_help)
    p.add_argument("--shard", help=shard_help)
    p.add_argument("--orientation", choices=["stored", "RAS"], default="stored", help=orientation_help)


def _add_plan_options(p: argparse.ArgumentParser) -> None:
    from medvol.preprocessing.planners import PLANNERS

    p.add_argument("--planner", choices=list(PLANNERS), default="default",
                   help="nnU-Net's experiment planner (-pl): default (ExperimentPlanner, plain U-Net) or a "
                        "Residual Encoder preset nnUNetPlannerResEncM/L/XL (8/24/40 GB; nnU-Net recommends L); "
                        "train a ResEnc plan with the quickstart_resenc recipe")
    p.add_argument("--gpu-memory", type=float, default=None, dest="gpu_memory_gb", action=_checked(validation.positive),
                   help="GPU memory target in GB for patch/batch size (nnU-Net's -gpu_memory_target; default: the "
                        "planner's own, 8 for default and resenc-m, 24 for resenc-l, 40 for resenc-xl)")
    p.add_argument("--interpolation", choices=["cubic", "linear"], default="cubic", dest="image_interpolation",
                   help="image resampling: cubic spline as nnU-Net (default) or torch trilinear (faster)")
    p.add_argument("--cache-dtype", choices=["float32", "float16"], default="float32", dest="cache_dtype",
                   help="dtype of the cached images")
    p.add_argument("--target-spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), dest="target_spacing",
                   action=_checked(validation.target_spacing),
                   help="fixed target spacing in mm instead of nnU-Net's rule (e.g. DoDNet: 0.8 0.8 1.5)")
    p.add_argument("--ct-window", type=float, nargs=2, metavar=("LO", "HI"), dest="ct_window",
                   action=_checked(validation.ct_window),
                   help="CT channels: clip to this HU window and divide by max(|LO|,|HI|) (DoDNet: -325 325)")
    p.add_argument("--from-plans", type=Path, default=None, metavar="PLANS_JSON", dest="from_plans",
                   help="another dataset's plans.json (its cache's) for this dataset, as nnU-Net's "
                        "move_plans_between_datasets: spacing, patch, batch, network, normalisation (CT statistics "
                        "included) from there, labels and channel names from here; for fine-tuning across datasets "
                        "(init_from). The planning options above do not apply with it")
    p.add_argument("--own-intensities", action="store_true", dest="own_intensities",
                   help="with --from-plans: this dataset's foreground intensity statistics (CT clip values, mean, "
                        "std) instead of the other dataset's")


def _add_train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True,
                   help="the preprocessing cache (medvol preprocess -o); PCRL also takes any folder of scans; "
                        "slice_aggregator the features of medvol extract-features")
    _add_out(p, "run folder (checkpoints, logs, recipe, plans)", short=False)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set trainer.steps=500 (repeatable)")
    p.add_argument("--fold", help="cross-validation fold of DATA/splits_final.json: 0-4 or 'all' (written with "
                                  "nnU-Net's rule when absent); data.val_cases in the recipe wins")
    p.add_argument("--resume", nargs="?", const=True, default=False, choices=[True, "auto"],
                   help="continue from OUT/checkpoints/latest.pt (semi_infnet: OUT/semi_state.json); `--resume "
                        "auto` starts fresh when there is none (one job script for the first start and every requeue)")
    _add_device(p, "cpu, cuda, cuda:1 or auto (default)")
    _add_precision(p, None, f"numerical precision (default: the recipe's trainer.precision, {AUTO_PRECISION})")
    p.add_argument("--nproc", type=int, default=1, action=_checked(validation.positive_int),
                   help="processes on this node (DDP through torchrun)")
    _add_common(p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="medvol", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"medvol {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("preprocess", help="fingerprint -> plan -> crop/normalise/resample into a cache")
    p.add_argument("raw", type=Path, help="raw dataset: nnU-Net/Decathlon folder, NIfTI folder or DICOM tree")
    _add_out(p, "output (cache) folder")
    _add_cache_options(p, "start from scratch instead of resuming",
                       "K/N: process cases K, K+N, ... (K from 0); needs `medvol plan` first",
                       "voxel order of the cache: each file's own (default, as nnU-Net) or every case "
                       "reoriented to RAS (datasets that mix storage orders); predictions come back as stored")
    _add_plan_options(p)
    _add_common(p)

    p = sub.add_parser("fingerprint", help="per-case fingerprints (and cropped arrays) only")
    p.add_argument("raw", type=Path)
    _add_out(p)
    _add_cache_options(p, None, "K/N: fingerprint cases K, K+N, ... (K from 0)",
                       "as for preprocess: the cache's voxel order (every shard must use the same)")
    _add_common(p)

    p = sub.add_parser("plan", help="merge fingerprints into fingerprint.json and write plans.json",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=PLAN_EXAMPLES)
    p.add_argument("out", type=Path, help="the folder `medvol fingerprint` wrote")
    _add_plan_options(p)
    _add_common(p)

    p = sub.add_parser("recipes", help="list the built-in recipes (name and purpose)")
    _add_common(p)

    p = sub.add_parser("train", help="train a recipe on a preprocessing cache",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TRAIN_EXAMPLES)
    p.add_argument("recipe", help="recipe YAML (a path, or a built-in recipe's name, e.g. quickstart: "
                                  "see medvol recipes)")
    p.add_argument("--no-final-validation", action="store_true",
                   help="skip the end-of-run validation (validation cases predicted from their raw scans into "
                        "OUT/validation/, with summary.json for medvol cv); same as "
                        "--set trainer.final_validation=false")
    _add_train_options(p)

    p = sub.add_parser("pretrain", help="PCRL self-supervised pretraining; writes OUT/encoder.pt")
    p.add_argument("--recipe", default="pcrl_pretrain",
                   help="a PCRL recipe (default pcrl_pretrain, the paper's; pcrl_demo is small)")
    _add_train_options(p)

    p = sub.add_parser("predict", help="predict whole scans with a trained run, in the scans' own geometry",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=PREDICT_EXAMPLES)
    p.add_argument("-m", "--model", type=Path, required=True, action="append",
                   help="run folder written by `medvol train`, a model file from `medvol export` (.zip), or a "
                        "folder of fold_* runs; repeat -m to ensemble (probabilities averaged). A slice "
                        "aggregator's run predicts subjects: OUT/subjects.csv and OUT/slices.csv")
    p.add_argument("-i", "--input", type=Path, required=True,
                   help="a scan file (NIfTI, .mhd, .nrrd), a folder of them (e.g. imagesTs) and of DICOM series "
                        "folders, or one DICOM series folder")
    _add_out(p, "output folder (<case>.nii.gz)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="mirroring test-time augmentation over the trained axes, about 2^axes times the "
                        "cost (default: the recipe's inference.tta)")
    p.add_argument("--overlap", type=float, default=None, action=_checked(validation.fraction),
                   help="sliding-window overlap in [0, 1) (default: the recipe's, or 0.5)")
    p.add_argument("--step", type=int, nargs="+", metavar="N", default=None,
                   help="sliding-window step in voxels of the preprocessed grid, per axis of the patch (X Y Z; "
                        "2 in-plane values for a 2D model; a paper's stride); replaces --overlap")
    _add_precision(p, None, f"numerical precision (default: the recipe's inference.precision, {AUTO_PRECISION})")
    p.add_argument("--all-windows", action="store_true", default=None,
                   help="also run the windows that lie wholly outside the scan's nonzero (body) mask "
                        "(default: they are skipped and read as background)")
    p.add_argument("--largest-component", action=argparse.BooleanOptionalAction, default=None,
                   help="keep only the largest connected component of each label (default: the recipe's)")
    p.add_argument("--postprocessing", type=Path, default=None, metavar="FILE",
                   help="apply the post-processing that `medvol best` decided (its OUT/postprocessing.json: "
                        "largest regions kept per nnU-Net's rule); replaces the recipe's largest-component setting")
    p.add_argument("--sw-batch-size", type=int, default=2, action=_checked(validation.positive_int),
                   help="windows per forward pass")
    _add_device(p)
    p.add_argument("--save-probabilities", action="store_true", help="also write <case>.npz (float16)")
    _add_checkpoint(p)
    p.add_argument("--task", help="task-conditioned models (DoDNet): a task id or name, or 'all' (default)")
    p.add_argument("--expertise", type=_weights, default=None, metavar="W1,...,WK",
                   help="MRNet: one weight per rater (normalised; default equal); writes <case>.npz probabilities too")
    p.add_argument("--no-pictures", action="store_true", help="skip the PNGs and index.html")
    _add_common(p)

    p = sub.add_parser("extract-features", help="a trained 2D slice classifier's per-slice features of every "
                                                "subject, for the slice aggregator")
    p.add_argument("run", type=Path, help="run folder of a 2D slice classifier (data.configuration: 2d)")
    p.add_argument("--data", type=Path, required=True,
                   help="a preprocessing cache made with the classifier's plan (subject classes from its "
                        "slice_labels.csv), or scans: a file, a folder of them, DICOM series folders")
    _add_out(p, "output folder (features.npz): the --data of `medvol train slice_aggregator`")
    p.add_argument("--labels", type=Path, help="a slice_labels.csv giving the subjects' classes (default: the "
                                               "cache's own)")
    _add_checkpoint(p)
    p.add_argument("--slice-batch", type=int, default=16, action=_checked(validation.positive_int),
                   help="slices per forward pass (default 16)")
    _add_precision(p, "auto", "the classifier's numerical precision (default auto, as medvol predict's: predict "
                              "with the precision the features were extracted with)")
    _add_device(p)
    _add_common(p)

    p = sub.add_parser("export", help="pack a run's model into one portable file for predict -m")
    p.add_argument("run", type=Path, help="run folder written by `medvol train`")
    _add_out(p, "the model file to write (.zip)")
    _add_checkpoint(p)
    _add_common(p)

    p = sub.add_parser("evaluate", help="metrics (Dice, Jaccard, HD95, ASD in mm, volumes) against references")
    p.add_argument("--pred", type=Path, required=True, help="folder of predicted label maps")
    p.add_argument("--ref", type=Path, required=True, help="folder of reference label maps (same file names)")
    _add_out(p, "metrics file stem (default PRED/metrics): .json and .csv", required=False)
    p.add_argument("--images", type=Path, help="images folder: also draw pictures and an index.html in PRED")
    p.add_argument("--kind", choices=["labels", "image", "vessels", "soft"], default="labels",
                   help="labels (default): label maps; image: PSNR and SSIM of images (super-resolution); "
                        "vessels: AUC, accuracy, sensitivity, specificity, F1 inside the FOV (AUC from "
                        "PRED/<case>.npz, written by predict --save-probabilities); soft: several raters "
                        "(REF/<case>_r<k>): soft Dice and ECE of PRED/<case>.npz probabilities, and a "
                        "reliability diagram")
    p.add_argument("--fov", type=Path, help="--kind vessels: folder of field-of-view masks (same file names); "
                                            "default: every pixel counts")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="--kind vessels: vessel where the probability >= this (default 0.5)")

    p.add_argument("--expertise", type=_weights, default=None, metavar="W1,...,WK",
                   help="--kind soft: rater weights of the soft reference (default equal)")
    _add_common(p)

    p = sub.add_parser("cv", help="merge the folds' end-of-run validations into one cross-validation table")
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN",
                   help="the folds' run folders, or one folder holding fold_* runs")
    _add_out(p, "output folder (cv_summary.json/.csv/.html, cv_dice.png); default: the folder of fold_* runs "
                "when one is given", required=False)
    _add_common(p)

    p = sub.add_parser("convert-msd", help="a Medical Segmentation Decathlon task folder -> nnU-Net v2 raw layout",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=CONVERT_MSD_EXAMPLES)
    p.add_argument("task", type=Path, help="the MSD task folder TaskNN_Name (dataset.json, imagesTr, imagesTs, "
                                           "labelsTr)")
    p.add_argument("out", type=Path, help="the raw folder (nnU-Net's nnUNet_raw) that gets DatasetNNN_Name/")
    p.add_argument("--id", type=int, default=None, dest="dataset_id", action=_checked(validation.positive_int),
                   help="dataset id (default: the task number, e.g. 5 for Task05_Prostate -> Dataset005_Prostate)")
    _add_common(p)

    p = sub.add_parser("check", help="verify a raw dataset as nnU-Net's --verify_dataset_integrity; writes nothing",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=CHECK_EXAMPLES)
    p.add_argument("raw", type=Path, help="raw dataset: nnU-Net v2 or Decathlon folder (also a NIfTI folder or "
                                          "DICOM tree)")
    _add_common(p)

    p = sub.add_parser("demo", help="the main job end to end on the built-in real data")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default ./demo_out)")
    _add_workers(p)
    p.add_argument("--steps", type=int, default=150, action=_checked(validation.positive_int),
                   help="training steps (default 150, a few minutes on 2 cores)")
    _add_device(p)
    _add_common(p)

    p = sub.add_parser("best", help="the best configuration or ensemble of cross-validated RUNs and its "
                                    "post-processing (nnU-Net's find_best_configuration)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=BEST_EXAMPLES)
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN",
                   help="one per configuration: a folder of its fold_* runs (each finished, with its end-of-run "
                        "validation), as medvol cv takes it")
    _add_out(p, "output folder: postprocessing.json, best.json, inference_instructions.txt, ensembles/")
    p.add_argument("--no-ensembles", action="store_true",
                   help="compare the configurations only (nnU-Net's --disable_ensembling)")
    _add_device(p, "where folds without saved validation probabilities predict them again (for ensembles)")
    _add_common(p)

    p = sub.add_parser("enhance", help="super-resolve scans with a trained SERAN run (NIfTI out, same field of view)")
    p.add_argument("-m", "--model", type=Path, required=True, help="run folder of `medvol train seran`")
    p.add_argument("-i", "--input", type=Path, required=True,
                   help="a scan file (NIfTI, .mhd, .nrrd), a folder of them and of DICOM series folders, or one "
                        "DICOM series folder")
    _add_out(p, "output folder (<case>.nii.gz, in-plane spacing divided by the run's scale)")
    p.add_argument("--slice-batch", type=int, default=8, action=_checked(validation.positive_int),
                   help="slices per forward pass (default 8)")
    _add_precision(p, "auto", f"numerical precision (default {AUTO_PRECISION})")
    _add_checkpoint(p)
    _add_device(p)
    _add_common(p)
    return parser


def _report(report, out: Path) -> int:
    print(f"{len(report.done)} case(s) processed, {len(report.skipped)} already done, "
          f"{len(report.failures)} failed -> {out}")
    if report.failures:
        print("failed cases:", file=sys.stderr)
        for case, err in sorted(report.failures.items()):
            print(f"  {case}: {err}", file=sys.stderr)
        return 1
    return 0


def _cmd_preprocess(a) -> int:
    from medvol.preprocessing import preprocess_dataset

    rep = preprocess_dataset(a.raw, a.out, a.workers, a.overwrite, a.shard, a.quiet, gpu_memory_gb=a.gpu_memory_gb,
                             image_interpolation=a.image_interpolation, cache_dtype=a.cache_dtype,
                             target_spacing=a.target_spacing, ct_window=a.ct_window, orientation=a.orientation,
                             planner=a.planner, **_transfer_options(a))
    return _report(rep, a.out)


def _cmd_fingerprint(a) -> int:
    from medvol.preprocessing import fingerprint_dataset

    return _report(fingerprint_dataset(a.raw, a.out, a.workers, a.shard, a.overwrite, a.quiet, a.orientation), a.out)


def _cmd_plan(a) -> int:
    from medvol.preprocessing import plan_dataset

    plans = plan_dataset(a.out, a.gpu_memory_gb, a.image_interpolation, a.cache_dtype, a.target_spacing, a.ct_window,
                         a.planner, **_transfer_options(a))
    print(f"target spacing {plans['target_spacing']} mm, patch {plans['patch_size']}, "
          f"batch {plans['batch_size']} -> {a.out / 'plans.json'}")
    if "transferred_from" in plans:
        t = plans["transferred_from"]
        print(f"transferred from {t['plans']}: {', '.join(t['from_source'])}; this dataset's own: "
              f"{', '.join(t['from_this_dataset'])}")
        for note in t["notes"]:
            print(f"  not transferred: {note}")
    return 0


PLANNING_OPTIONS = {"planner": "default", "gpu_memory_gb": None, "target_spacing": None, "ct_window": None}


def _transfer_options(a) -> dict:
    """``--from-plans``/``--own-intensities`` for plan_dataset; the planning options that the
    transferred plans replace are refused beside --from-plans."""
    if a.from_plans is None:
        if a.own_intensities:
            raise ConfigError("--own-intensities applies with --from-plans only")
        return {}
    given = [k for k, default in PLANNING_OPTIONS.items() if getattr(a, k) != default]
    if given:
        raise ConfigError(f"--{given[0].replace('_gb', '').replace('_', '-')} and --from-plans: the transferred plans "
                          "decide it (plan without --from-plans to choose it)")
    return {"from_plans": a.from_plans, "own_intensities": a.own_intensities}


def _cmd_recipes(a) -> int:
    from medvol.config import recipe_purposes

    purposes = recipe_purposes()
    width = max(map(len, purposes), default=0)
    for name, purpose in purposes.items():
        print(f"{name:<{width}}  {purpose}")
    return 0


def _cmd_train(a) -> int:
    import os

    from medvol.training import load_recipe  # the method: section parsed too

    if a.fold is not None:
        a.overrides = [*a.overrides, f"data.fold={a.fold}"]
    if a.precision is not None:
        a.overrides = [*a.overrides, f"trainer.precision={a.precision}"]
    if getattr(a, "no_final_validation", False):
        a.overrides = [*a.overrides, "trainer.final_validation=false"]
    recipe = load_recipe(a.recipe, a.overrides)  # fail early, before any process is spawned
    if a.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from medvol.training.distributed import launch

        argv, skip = [], False
        for x in sys.argv[1:]:  # the same command minus --nproc N / --nproc=N
            if skip:
                skip = False
            elif x == "--nproc":
                skip = True
            elif not x.startswith("--nproc="):
                argv.append(x)
        return launch(a.nproc, argv)
    from medvol.training import train

    metrics = train(recipe, a.data, a.out, resume=a.resume, device=a.device, quiet=a.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        summary = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        print(f"trained {recipe.name} -> {a.out}" + (f" ({summary})" if summary else ""))
        if (Path(a.out) / "encoder.pt").exists():
            print(f"encoder weights: {Path(a.out) / 'encoder.pt'} (fine-tune with --set init_from=...)")
    return 0


def _weights(text: str) -> list[float]:
    """``--expertise 1,0,0``: comma-separated numbers."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers (one per rater), got {text!r}") from None


def _cmd_predict(a) -> int:
    """One ``medvol predict`` at a time per output folder (``OUT/.medvol-predict.lock``).
    SIGTERM, SIGUSR1 and Ctrl-C stop a segmentation run between two cases (exit 75 or 130,
    one line naming the cases not written); the lock and unpacked model zips are removed."""
    import signal

    from medvol.inference.subjects import is_subject_run
    from medvol.manifest import locked
    from medvol.training.preemption import SIGNALS, PreemptionFlag

    if len(a.model) == 1 and is_subject_run(a.model[0]):
        with locked(a.out, "predict"):
            return _predict_subjects(a)
    with PreemptionFlag((*SIGNALS, signal.SIGINT)) as flag, locked(a.out, "predict"):
        return _predict_segmentations(a, stop=lambda: flag.signum)


def _predict_segmentations(a, stop) -> int:
    from medvol.inference import predict

    models = a.model if len(a.model) > 1 else a.model[0]
    postprocess = None
    if a.postprocessing is not None:
        from medvol.inference.postprocess import postprocessing_from_file
        from medvol.inference.predictor import model_plans

        if a.largest_component is not None:
            raise ConfigError("--postprocessing and --largest-component: give one (the file decides which largest "
                              "components are kept)")
        postprocess = postprocessing_from_file(a.postprocessing, model_plans(models).raw["labels"])
    written = predict(models, a.input, a.out, a.device, a.tta, a.overlap, a.sw_batch_size, a.save_probabilities,
                      a.checkpoint, a.quiet, postprocess=postprocess, largest_component_only=a.largest_component,
                      task=a.task,
                      step=a.step, precision=a.precision, all_windows=a.all_windows, stop=stop,
                      expertise=a.expertise)
    if not a.no_pictures:
        from medvol.evaluation.report import write_report
        from medvol.inference.predictor import model_plans
        from medvol.io.discovery import input_cases

        plans = model_plans(models)
        groups = dict(input_cases(a.input, plans.num_channels))
        names = plans.label_names
        def source(stem):  # "<case>" or "<case>_<task>" -> the case's image
            return next(groups[c][0] for c in sorted(groups, key=len, reverse=True) if stem.startswith(c))

        index = write_report(a.out, {p.name[:-7]: (source(p.name[:-7]), p, None) for p in written}, names=names,
                             title=f"medvol predictions ({', '.join(m.name for m in a.model)})")
        print(f"pictures: {index}")
    print(f"{len(written)} prediction(s) -> {a.out}")
    return 0


SEGMENTATION_ONLY = ("tta", "overlap", "step", "largest_component", "task", "all_windows")


def _predict_subjects(a) -> int:
    """``medvol predict -m AGG_RUN``: the two-stage subject pipeline."""
    from medvol.inference.subjects import predict_subjects

    given = [o for o in SEGMENTATION_ONLY if getattr(a, o) is not None] + (["save_probabilities"]
                                                                          if a.save_probabilities else [])
    if given:
        raise ConfigError(f"--{given[0].replace('_', '-')}: {a.model[0]} predicts subject classes (a slice "
                          "aggregator's run); the option applies to segmentation models only")
    written = predict_subjects(a.model[0], a.input, a.out, a.device, a.checkpoint, a.quiet,
                               precision=a.precision or "auto")
    print(f"subject predictions -> {written[0]}, per-slice scores -> {written[1]}")
    return 0


def _cmd_extract_features(a) -> int:
    from medvol.inference.subjects import extract_features

    path = extract_features(a.run, a.data, a.out, a.device, a.checkpoint, a.labels, a.slice_batch, a.quiet,
                            a.precision)
    print(f"features -> {path} (medvol train slice_aggregator --data {a.out} --out RUN)")
    return 0


def _cmd_export(a) -> int:
    """SIGTERM/SIGUSR1 stop it before the zip is renamed into place: exit 75, nothing written."""
    from medvol.export import export_model
    from medvol.training.preemption import PreemptionFlag

    if a.out.suffix != ".zip":
        raise ConfigError(f"export -o {a.out}: the model file must end in .zip")
    with PreemptionFlag() as flag:
        model = export_model(a.run, a.out, a.checkpoint, stop=flag.stop_point)
    print(f"model -> {model} (medvol predict -m {a.out} ...)")
    return 0


def _cmd_evaluate(a) -> int:
    from medvol.evaluation import evaluate_folders

    if a.fov is not None and a.kind != "vessels":
        raise ConfigError("evaluate --fov: the field-of-view mask is used by the vessel metrics only "
                          "(add --kind vessels)")
    if a.kind == "image":
        return _evaluate_images(a)
    if a.expertise is not None and a.kind != "soft":
        raise ConfigError("evaluate --expertise: rater weights are used by --kind soft only")
    if a.kind == "vessels":
        return _evaluate_vessels(a)
    out = a.out or (a.pred / "metrics")
    if a.kind == "soft":
        return _evaluate_soft(a, out)
    res = evaluate_folders(a.pred, a.ref, out)
    for cls, s in res["summary"].items():
        print(f"{cls}: Dice {s['dice']['mean']:.4f} ± {s['dice']['std']:.4f}, HD95 {s['hd95']['mean']:.2f} mm, "
              f"ASD {s['asd']['mean']:.2f} mm (n={s['dice']['n']})")
    print(f"metrics: {out.with_suffix('.json')} and .csv")
    if a.images:
        from medvol.evaluation.report import write_report
        from medvol.io.dataset_json import dataset_labels
        from medvol.io.discovery import input_cases
        from medvol.labels import IGNORE

        groups = dict(input_cases(a.images, 1))
        cases = {c: (groups[c][0], a.pred / f"{c}.nii.gz", a.ref / f"{c}.nii.gz") for c in res["cases"] if c in groups}
        ignore = (dataset_labels(a.ref.parent) or {}).get(IGNORE)  # sparse references: drawn as no class
        print(f"report: {write_report(a.pred, cases, res, ignore=ignore if isinstance(ignore, int) else None)}")
    return 0


def _evaluate_images(a) -> int:
    from medvol.evaluation.image import evaluate_image_folders

    out = a.out or (a.pred / "image_metrics")
    s = evaluate_image_folders(a.pred, a.ref, out)["summary"]
    print(f"PSNR {s['psnr']['mean']:.2f} ± {s['psnr']['std']:.2f} dB, SSIM {s['ssim']['mean']:.4f} ± "
          f"{s['ssim']['std']:.4f} (n={s['psnr']['n']})")
    print(f"metrics: {out.with_suffix('.json')} and .csv")
    return 0


def _evaluate_vessels(a) -> int:
    from medvol.evaluation.metrics import VESSEL_METRICS, evaluate_vessel_folders

    out = a.out or (a.pred / "vessel_metrics")
    res = evaluate_vessel_folders(a.pred, a.ref, a.fov, out, a.threshold)
    print(", ".join(f"{k} {res['summary'][k]:.4f}" for k in VESSEL_METRICS) + f" (mean of {len(res['cases'])} images)")
    print(f"metrics: {out.with_suffix('.json')} and .csv")
    return 0


def _evaluate_soft(a, out: Path) -> int:
    from medvol.evaluation.calibration import evaluate_soft

    res = evaluate_soft(a.pred, a.ref, out, a.expertise)
    for cls, s in res["summary"].items():
        print(f"{cls}: soft Dice {s['soft_dice']:.4f}, ECE {s['ece']:.4f} (n={len(res['cases'])})")
    print(f"metrics: {out.parent / (out.name + '_calibration.json')} and {out.name}_reliability.png")
    return 0


def _cmd_enhance(a) -> int:
    from medvol.inference.enhance import enhance
    from medvol.inference.predictor import resolve_device

    written = enhance(a.model, a.input, a.out, resolve_device(a.device), a.checkpoint, a.quiet, a.slice_batch,
                      a.precision)
    print(f"{len(written)} enhanced scan(s) -> {a.out}")
    return 0


def _cmd_cv(a) -> int:
    from medvol.evaluation.crossval import FOREGROUND, cross_validation, write_cross_validation
    from medvol.training.preemption import PreemptionFlag

    out = a.out
    if out is None:
        if len(a.runs) != 1 or (a.runs[0] / "recipe.yaml").exists():
            raise ConfigError("medvol cv: give -o OUT (the default, the folder of fold_* runs, needs exactly one "
                              "such folder)")
        out = a.runs[0]
    with PreemptionFlag() as flag:  # SIGTERM/SIGUSR1: stop before the files are renamed into place (exit 75)
        res = cross_validation(a.runs)
        written = write_cross_validation(res, out, stop=flag.stop_point)
    pooled, folds = res["all_cases"], res["mean_of_folds"]
    for c in [*res["classes"], FOREGROUND]:
        d, f = pooled["summary"][c]["dice"], folds["summary"][c]["dice"]
        print(f"{c}: Dice {d['mean']:.4f} over {pooled['n_cases']} case(s); mean of {folds['n_folds']} fold(s) "
              f"{f['mean']:.4f} ± {f['std']:.4f}")
    print(f"cross-validation: {written[0]} (.csv, .html) and {written[3].name}")
    return 0


def _cmd_best(a) -> int:
    from medvol.evaluation.crossval import FOREGROUND
    from medvol.inference.best import find_best_configuration

    info = find_best_configuration(a.runs, a.out, not a.no_ensembles, a.device, a.quiet)
    for name, d in info["all_results"].items():
        print(f"{name}: foreground-mean Dice {d[FOREGROUND]:.4f}")
    print(f"\n{info['instructions']}\n\n(written to {a.out / 'inference_instructions.txt'}; scores in "
          f"{a.out / 'best.json'})")
    return 0


def _cmd_convert_msd(a) -> int:
    from medvol.preprocessing.convert_msd import convert_msd

    target = convert_msd(a.task, a.out, a.dataset_id)
    print(f"{a.task} -> {target} (check it with: medvol check {target})")
    return 0


def _cmd_check(a) -> int:
    from medvol.preprocessing.integrity import check_raw_dataset

    rep = check_raw_dataset(a.raw)
    print(f"{a.raw} ({rep.layout}): {len(rep.checked)} case(s) checked, {len(rep.problems)} with problems")
    for case, problem in rep.problems.items():
        print(f"  {case}: {problem}", file=sys.stderr)
    return 0 if rep.ok else 2


def _cmd_demo(a) -> int:
    """The demo application ships with the dataset builders (``datasets/demo.py``): run it,
    so that nothing under ``medvol/`` imports them."""
    import subprocess

    argv = ["--out", str(a.out), "--steps", str(a.steps), "--device", a.device]
    argv += (["-j", str(a.workers)] if a.workers else []) + (["--quiet"] if a.quiet else [])
    return subprocess.call([sys.executable, "-m", "medvol.datasets.demo", *argv])


COMMANDS = {"preprocess": _cmd_preprocess, "fingerprint": _cmd_fingerprint, "plan": _cmd_plan,
            "recipes": _cmd_recipes, "train": _cmd_train, "export": _cmd_export,
            "pretrain": _cmd_train, "predict": _cmd_predict, "extract-features": _cmd_extract_features,
            "evaluate": _cmd_evaluate, "cv": _cmd_cv, "demo": _cmd_demo,
            "convert-msd": _cmd_convert_msd, "check": _cmd_check, "best": _cmd_best,
            "enhance": _cmd_enhance}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    code = _run(args)
    # looked up, not imported: only a command that trained has it loaded (a plain import would
    # load torch for every command)
    group = sys.modules.get("medvol.training.distributed")
    if group is not None and group.joined_a_group():  # one of several processes: leave at once
        group.exit_process(code)
    return code


def _run(args: argparse.Namespace) -> int:
    """The command's exit status; a medvol error or a stop is one line on stderr."""
    try:
        return COMMANDS[args.command](args)
    except (MedvolError, OSError) as e:
        if isinstance(e, OSError) and e.errno not in ENVIRONMENT_ERRNOS:
            raise  # not the user's to fix: a real traceback
        err = e if isinstance(e, MedvolError) else (f"{e.filename}: {e.strerror}" if e.filename else e.strerror)
        if args.debug:
            import traceback

            traceback.print_exception(e, file=sys.stderr)
        print(f"medvol {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Stopped as e:  # pre-empted training, predict stopped between cases
        print(f"medvol {args.command}: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return INTERRUPTED_EXIT


if __name__ == "__main__":
    sys.exit(main())
