"""Raw dataset layouts: discovery and per-case validation.

Accepted layouts:
- nnU-Net v2: ``dataset.json`` with ``channel_names``, ``labels``, ``file_ending``
  (+ ``numTraining``); ``imagesTr/<case>_<cccc><ext>``, ``labelsTr/<case><ext>``, ``imagesTs/``.
- Medical Segmentation Decathlon: ``dataset.json`` with ``modality``, ``labels``
  (value -> name), ``training``/``test`` lists; 4D images hold the channels.
- A plain folder of scan files (NIfTI, MetaImage, NRRD): one case per file, no labels.
- A folder tree of DICOM files: one case per series folder, no labels.
Which files are scans and which folders are DICOM series: :mod:`medvol.io.discovery`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medvol.errors import InputError
from medvol.io import Volume, read_volume
from medvol.io.dicom import group_series, list_dicom_files
from medvol.io.discovery import find_scans, scan_id, scan_stem, scan_suffix

NNUNET_V2_KEYS = {"channel_names", "labels", "numTraining", "file_ending"}
DECATHLON_KEYS = {"modality", "labels", "training"}
OPTIONAL_KEYS = {"name", "description", "reference", "licence", "license", "release", "tensorImageSize",
                 "numTest", "test", "overwrite_image_reader_writer", "regions_class_order", "dataset_name",
                 "author", "citation", "converted_by", "link", "relase", "modalities",
                 # medvol extensions: semi-supervised splits and the ids cases had in their source
                 "labelled_cases", "source_ids", "case_tasks", "tasks"}


@dataclass
class RawCase:
    """One case: one source per channel (files, or a single 4D file, or a DICOM folder)."""

    case_id: str
    images: list[Path]
    label: Path | None = None
    multichannel_file: bool = False  # True when images[0] is one 4D file holding all channels
    extra: dict = field(default_factory=dict)
    problem: InputError | None = None  # found at discovery (missing file): reported when processed


@dataclass
class RawDataset:
    root: Path
    layout: str  # "nnunet_v2" | "decathlon" | "nifti_folder" | "dicom_tree"
    channel_names: dict[int, str]
    labels: dict[str, int]
    file_ending: str
    training: list[RawCase]
    test: list[RawCase]
    labelled_cases: list[str] | None = None  # semi-supervised: only these training labels are used
    case_meta: dict = field(default_factory=dict)  # per case: task_id, annotated channels (partial labels)
    tasks: dict | None = None  # partial labels: task id -> name (and its channel rules)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def label_values(self) -> list[int]:
        return sorted(set(self.labels.values()))

    def dataset_json(self) -> dict:
        return {"channel_names": {str(k): v for k, v in self.channel_names.items()}, "labels": self.labels,
                "numTraining": len(self.training), "file_ending": self.file_ending, "layout": self.layout,
                "labelled_cases": self.labelled_cases, "tasks": self.tasks}


def _inside(root: Path, rel: str, where: Path) -> Path:
    p = (root / rel).resolve()
    if root.resolve() not in p.parents and p != root.resolve():
        raise InputError(where, f"path '{rel}' escapes the dataset folder {root}")
    return p


def open_raw_dataset(path: str | Path) -> RawDataset:
    """Find the layout of ``path`` and list its cases (files are checked to exist, not read)."""
    root = Path(path)
    if not root.exists():
        raise InputError(root, "dataset folder not found")
    if root.is_file():
        raise InputError(root, "expected a dataset folder, got a file")
    if (root / "dataset.json").exists():
        return _open_with_json(root)
    files = [p for p in find_scans(root) if p.is_file()]
    if files:
        cases = [RawCase(scan_stem(p.name), [p], None, multichannel_file=True) for p in files]
        return RawDataset(root, "nifti_folder", {0: "MRI"}, {"background": 0}, _ending(files[0].name), cases, [])
    cases = []
    for d in (p for p in find_scans(root, recursive=True) if p.is_dir()):
        series = group_series(list_dicom_files(d))
        if len(series) > 1:
            raise InputError(d, f"{len(series)} series mixed in one folder ({', '.join(series)}): "
                                "put each series in its own folder")
        if series:
            cases.append(RawCase(scan_id(root, d), [d], None, multichannel_file=True))
    if cases:
        return RawDataset(root, "dicom_tree", {0: "DICOM"}, {"background": 0}, "", cases, [])
    raise InputError(root, "no scans found: expected dataset.json (nnU-Net/Decathlon), NIfTI files or DICOM series")


def _ending(name: str) -> str:
    return scan_suffix(name) or Path(name).suffix


def _open_with_json(root: Path) -> RawDataset:
    jpath = root / "dataset.json"
    try:
        meta = json.loads(jpath.read_text())
    except json.JSONDecodeError as e:
        raise InputError(jpath, f"invalid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise InputError(jpath, "must hold a JSON object")
    keys = set(meta)
    is_v2 = "channel_names" in meta or "file_ending" in meta
    required = NNUNET_V2_KEYS if is_v2 else DECATHLON_KEYS
    missing = required - keys
    if missing:
        kind = "nnU-Net v2" if is_v2 else "Decathlon"
        raise InputError(jpath, f"missing key(s) {sorted(missing)} required by the {kind} layout")
    unknown = keys - NNUNET_V2_KEYS - DECATHLON_KEYS - OPTIONAL_KEYS
    if unknown:
        raise InputError(jpath, f"unknown key(s) {sorted(unknown)}; known keys are "
                                f"{sorted(NNUNET_V2_KEYS | DECATHLON_KEYS | OPTIONAL_KEYS)}")
    labels = _parse_labels(jpath, meta["labels"], is_v2)
    if is_v2:
        channels = meta["channel_names"]
        ending = meta["file_ending"]
        channel_names = {int(k): str(v) for k, v in channels.items()}
        if sorted(channel_names) != list(range(len(channel_names))):
            raise InputError(jpath, f"channel_names keys must be 0..N-1, got {sorted(channel_names)}")
        training = _v2_cases(root, "imagesTr", "labelsTr", ending, len(channel_names), jpath)
        test = _v2_cases(root, "imagesTs", "labelsTs", ending, len(channel_names), jpath, labels_optional=True)
        if "numTraining" in meta and int(meta["numTraining"]) != len(training):
            raise InputError(jpath, f"numTraining is {meta['numTraining']} but imagesTr holds {len(training)} cases")
        labelled = meta.get("labelled_cases")
        if labelled is not None:
            unknown_cases = sorted(set(labelled) - {c.case_id for c in training})
            if unknown_cases:
                raise InputError(jpath, f"labelled_cases names cases not in imagesTr: {unknown_cases[:5]}")
        case_meta = meta.get("case_tasks") or {}
        if not isinstance(case_meta, dict) or not all(isinstance(v, dict) for v in case_meta.values()):
            raise InputError(jpath, "case_tasks must map case ids to {task_id, annotated}")
        return RawDataset(root, "nnunet_v2", channel_names, labels, ending, training, test, labelled, case_meta,
                          meta.get("tasks"))
    channel_names = {int(k): str(v) for k, v in meta["modality"].items()}
    training = []
    for item in meta["training"]:
        if not isinstance(item, dict) or "image" not in item or "label" not in item:
            raise InputError(jpath, f"each 'training' entry needs 'image' and 'label', got {item!r}")
        img = _inside(root, item["image"], jpath)
        lab = _inside(root, item["label"], jpath)
        training.append(RawCase(scan_stem(img.name), [img], lab, multichannel_file=True))
    test = []
    for item in meta.get("test", []):
        img = _inside(root, item if isinstance(item, str) else item["image"], jpath)
        test.append(RawCase(scan_stem(img.name), [img], None, multichannel_file=True))
    ending = _ending(training[0].images[0].name) if training else ".nii.gz"
    return RawDataset(root, "decathlon", channel_names, labels, ending, training, test)


def _parse_labels(jpath: Path, labels, is_v2: bool) -> dict[str, int]:
    if not isinstance(labels, dict) or not labels:
        raise InputError(jpath, "'labels' must be a non-empty mapping")
    out = {}
    for k, v in labels.items():
        if is_v2:
            if isinstance(v, (list, tuple)):
                raise InputError(jpath, f"label '{k}' is a region {v}: region-based training is not supported")
            name, value = str(k), v
        else:  # Decathlon: "0": "background"
            name, value = str(v), k
        try:
            out[name] = int(value)
        except (TypeError, ValueError):
            raise InputError(jpath, f"label '{k}': value {value!r} is not an integer") from None
    if 0 not in out.values():
        raise InputError(jpath, "labels must declare background as 0")
    return out


def _v2_cases(root: Path, img_dir: str, lab_dir: str, ending: str, n_channels: int, jpath: Path,
              labels_optional: bool = False) -> list[RawCase]:
    idir = root / img_dir
    if not idir.is_dir():
        if labels_optional:
            return []
        raise InputError(idir, "missing images folder of the nnU-Net v2 layout")
    by_case: dict[str, dict[int, Path]] = {}
    for p in sorted(idir.iterdir()):
        if not p.name.endswith(ending) or p.name.startswith("."):
            continue
        stem = p.name[: -len(ending)]
        if len(stem) < 6 or stem[-5] != "_" or not stem[-4:].isdigit():
            raise InputError(p, f"image names must be <case>_<cccc>{ending} (channel as 4 digits)")
        by_case.setdefault(stem[:-5], {})[int(stem[-4:])] = p
    cases = []
    for case, chans in sorted(by_case.items()):
        problem = None
        missing = [c for c in range(n_channels) if c not in chans]
        extra = sorted(set(chans) - set(range(n_channels)))
        lab = root / lab_dir / f"{case}{ending}"
        if missing:
            problem = InputError(idir / f"{case}_{missing[0]:04d}{ending}",
                                 f"case '{case}' is missing channel file(s) {missing}")
        elif extra:
            problem = InputError(chans[extra[0]], f"channel {extra[0]} is not declared in channel_names")
        if not lab.exists() and not labels_optional and problem is None:
            problem = InputError(lab, f"label file of case '{case}' is missing")
        cases.append(RawCase(case, [chans.get(c, idir / f"{case}_{c:04d}{ending}") for c in range(n_channels)],
                             lab if lab.exists() else None, problem=problem))
    return cases


@dataclass
class LoadedCase:
    image: np.ndarray  # (C, X, Y, Z) float32
    label: np.ndarray | None  # (1, X, Y, Z) int16
    reference: Volume  # first channel's volume (geometry)


def load_raw_case(case: RawCase, dataset: RawDataset, check_labels: bool = True) -> LoadedCase:
    """Read and validate one case: channels present and agreeing in shape and affine with
    each other and the label, intensities finite, label values declared."""
    if case.problem is not None:
        raise case.problem
    vols = [read_volume(p) for p in case.images]
    ref = vols[0]
    channels = []
    for p, v in zip(case.images, vols):
        _check_geometry(p, v, case.images[0], ref)
        channels.append(v.channel_first())
    image = np.concatenate(channels) if len(channels) > 1 else channels[0]
    if image.shape[0] != dataset.num_channels and dataset.layout not in ("nifti_folder", "dicom_tree"):
        raise InputError(case.images[0], f"holds {image.shape[0]} channel(s), dataset.json declares "
                                         f"{dataset.num_channels}")
    finite = np.isfinite(image)
    if not finite.all():
        c = int(np.argwhere(~finite)[0][0])
        bad = int((~finite).sum())
        raise InputError(case.images[min(c, len(case.images) - 1)],
                         f"{bad} non-finite intensity value(s) (NaN/inf) in channel {c}")
    label = None
    if case.label is not None:
        lv = read_volume(case.label)
        if lv.array.ndim != 3:
            raise InputError(case.label, f"label must be a 3D image, got shape {lv.array.shape}")
        _check_geometry(case.label, lv, case.images[0], ref)
        lab = np.asarray(lv.array)
        if not np.issubdtype(lab.dtype, np.integer):
            if not np.all(np.isfinite(lab)) or not np.array_equal(lab, np.round(lab)):
                raise InputError(case.label, "label values must be integers")
        lab = lab.astype(np.int16)
        if check_labels:
            present = np.unique(lab)
            undeclared = sorted(set(present.tolist()) - set(dataset.label_values))
            if undeclared:
                raise InputError(case.label, f"label value(s) {undeclared} are not declared in dataset.json "
                                             f"(declared: {dataset.label_values})")
        label = lab[None]
    return LoadedCase(image, label, ref)


def _check_geometry(path: Path, vol: Volume, ref_path: Path, ref: Volume) -> None:
    if vol.spatial_shape != ref.spatial_shape:
        raise InputError(path, f"shape {vol.spatial_shape} differs from {ref_path.name}'s {ref.spatial_shape}")
    # nnU-Net's tolerance: direction/origin/spacing equal to about 1e-4 relative.
    if not np.allclose(vol.affine, ref.affine, rtol=1e-4, atol=1e-3):
        diff = float(np.abs(vol.affine - ref.affine).max())
        raise InputError(path, f"affine differs from {ref_path.name}'s by up to {diff:.4g} (mm or direction "
                               f"cosine): not on the same voxel grid; origin {np.round(vol.affine[:3, 3], 3).tolist()} "
                               f"vs {np.round(ref.affine[:3, 3], 3).tolist()}")
