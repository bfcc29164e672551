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

import difflib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medvol.errors import InputError
from medvol.io import Volume, read_volume
from medvol.io.dataset_json import DATASET_JSON, is_nnunet_v2, parse_labels, parse_raters, read_dataset_json
from medvol.io.dicom import group_series, list_dicom_files
from medvol.io.discovery import find_scans, scan_id, scan_stem, scan_suffix, split_channel
from medvol.io.orientation import orient_channels
from medvol.io.volume import c_order, spacing_from_affine
from medvol.labels import LabelScheme

log = logging.getLogger(__name__)

NNUNET_V2_KEYS = {"channel_names", "labels", "numTraining", "file_ending"}
DECATHLON_KEYS = {"modality", "labels", "training"}
# Read (or only informative) keys; any other key is ignored with a warning naming it.
OPTIONAL_KEYS = {"name", "description", "reference", "licence", "license", "release", "tensorImageSize",
                 "numTest", "test", "dataset_name", "author", "citation", "converted_by", "link", "relase",
                 "modalities", "overwrite_image_reader_writer", "regions_class_order",
                 # medvol extensions: semi-supervised splits and the ids cases had in their source
                 "labelled_cases", "source_ids", "case_tasks", "tasks",
                 "raters"}  # multi-rater labels: labelsTr/<case>_r<k><ext> per rater k (see RATER_SUFFIX)
# nnU-Net keys that change what the dataset means: medvol does not do what they ask, so they are refused.
REFUSED_KEYS = {"dataset": "cases listed in 'dataset' (files outside imagesTr/labelsTr) are not supported; "
                           "put the files in imagesTr/ and labelsTr/"}
KNOWN_KEYS = NNUNET_V2_KEYS | DECATHLON_KEYS | OPTIONAL_KEYS | set(REFUSED_KEYS)
# overwrite_image_reader_writer: nnU-Net reader classes that read as medvol's own readers do (each scan
# on its own voxel grid, geometry kept), with the file endings they read (None: any medvol reads).
# "None" is nnU-Net's spelling of "not set"; SimpleITKIO is its default for NIfTI, MetaImage and NRRD.
SAME_READERS = {"None": None, "SimpleITKIO": None, "NibabelIO": (".nii", ".nii.gz")}
READER_REFUSALS = {"NibabelIOWithReorient": "medvol keeps each scan's own voxel order and does not reorient "
                                            "it to RAS; remove the key (or reorient the files) to train on them"}


@dataclass
class RawCase:
    """One case: one source per channel (files, or a single 4D file, or a DICOM folder)."""

    case_id: str
    images: list[Path]
    label: Path | None = None
    multichannel_file: bool = False  # True when images[0] is one 4D file holding all channels
    extra: dict = field(default_factory=dict)
    problem: InputError | None = None  # found at discovery (missing file): reported when processed
    rater_labels: list[Path] | None = None  # multi-rater datasets: one label file per rater (label: the first)


@dataclass
class RawDataset:
    root: Path
    layout: str  # "nnunet_v2" | "decathlon" | "nifti_folder" | "dicom_tree"
    channel_names: dict[int, str]
    labels: dict  # name -> value, region (list of values) or the ignore label (medvol.labels)
    file_ending: str
    training: list[RawCase]
    test: list[RawCase]
    labelled_cases: list[str] | None = None  # semi-supervised: only these training labels are used
    case_meta: dict = field(default_factory=dict)  # per case: task_id, annotated channels (partial labels)
    tasks: dict | None = None  # partial labels: task id -> name (and its channel rules)
    raters: list[str] | None = None  # multi-rater labels: the raters' names, in label-channel order
    regions_class_order: list[int] | None = None  # region-based training (medvol.labels)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def label_values(self) -> list[int]:
        """The values a label file may hold (the ignore label included)."""
        return LabelScheme.parse(self.root, self.labels, self.regions_class_order).file_values

    def dataset_json(self) -> dict:
        regions = {"regions_class_order": self.regions_class_order} if self.regions_class_order else {}
        return {**regions, "channel_names": {str(k): v for k, v in self.channel_names.items()}, "labels": self.labels,
                "numTraining": len(self.training), "file_ending": self.file_ending, "layout": self.layout,
                "labelled_cases": self.labelled_cases, "tasks": self.tasks,
                **({"raters": self.raters} if self.raters else {})}


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
    if (root / DATASET_JSON).exists():
        return _open_with_json(root)
    files = [p for p in find_scans(root) if p.is_file()]
    if files:
        cases = _unique_ids([RawCase(scan_stem(p.name), [p], None, multichannel_file=True) for p in files])
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
        return RawDataset(root, "dicom_tree", {0: "DICOM"}, {"background": 0}, "", _unique_ids(cases), [])
    raise InputError(root, "no scans found: expected dataset.json (nnU-Net/Decathlon), NIfTI files or DICOM series")


def _ending(name: str) -> str:
    return scan_suffix(name) or Path(name).suffix


def _open_with_json(root: Path) -> RawDataset:
    jpath = root / DATASET_JSON
    meta = read_dataset_json(jpath)
    is_v2 = is_nnunet_v2(meta)
    _check_keys(jpath, meta, is_v2)
    _check_types(jpath, meta)
    _check_reader(jpath, meta)
    labels = parse_labels(jpath, meta["labels"], is_v2, meta.get("regions_class_order"))
    if "raters" in meta and not is_v2:
        raise InputError(jpath, "'raters' (one label file per rater) needs the nnU-Net v2 layout (channel_names, "
                                "file_ending, labelsTr/<case>_r<k><ending>)")
    ds = _open_v2(root, jpath, meta, labels) if is_v2 else _open_decathlon(root, jpath, meta, labels)
    if is_v2 and LabelScheme.parse(jpath, labels, meta.get("regions_class_order")).has_regions:
        ds.regions_class_order = [int(v) for v in meta["regions_class_order"]]
    return ds


def _open_v2(root: Path, jpath: Path, meta: dict, labels: dict) -> RawDataset:
    ending = meta["file_ending"]
    channel_names = _channel_names(jpath, meta["channel_names"], "channel_names")
    labelled = meta.get("labelled_cases")
    raters = parse_raters(jpath, meta.get("raters"))
    training = _v2_cases(root, "imagesTr", "labelsTr", ending, len(channel_names), jpath, labelled=labelled,
                         raters=raters)
    test = _v2_cases(root, "imagesTs", "labelsTs", ending, len(channel_names), jpath, labels_optional=True,
                     raters=raters)
    if "numTraining" in meta and meta["numTraining"] != len(training):
        raise InputError(jpath, f"numTraining is {meta['numTraining']} but imagesTr holds {len(training)} cases")
    if labelled is not None:
        unknown_cases = sorted(set(labelled) - {c.case_id for c in training})
        if unknown_cases:
            raise InputError(jpath, f"labelled_cases names cases not in imagesTr: {unknown_cases[:5]}")
    case_meta = meta.get("case_tasks") or {}
    if not isinstance(case_meta, dict) or not all(isinstance(v, dict) for v in case_meta.values()):
        raise InputError(jpath, "case_tasks must map case ids to {task_id, annotated}")
    return RawDataset(root, "nnunet_v2", channel_names, labels, ending, training, test, labelled, case_meta,
                      meta.get("tasks"), raters)


def _open_decathlon(root: Path, jpath: Path, meta: dict, labels: dict) -> RawDataset:
    channel_names = _channel_names(jpath, meta["modality"], "modality")
    training = []
    for item in meta["training"]:
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in ("image", "label")):
            raise InputError(jpath, f"each 'training' entry needs 'image' and 'label' paths, got {item!r}")
        img = _inside(root, item["image"], jpath)
        lab = _inside(root, item["label"], jpath)
        training.append(RawCase(scan_stem(img.name), [img], lab, multichannel_file=True))
    test = []
    for item in meta.get("test", []):
        if not isinstance(item, str) and not (isinstance(item, dict) and isinstance(item.get("image"), str)):
            raise InputError(jpath, f"each 'test' entry must be an image path (or {{'image': path}}), got {item!r}")
        img = _inside(root, item if isinstance(item, str) else item["image"], jpath)
        test.append(RawCase(scan_stem(img.name), [img], None, multichannel_file=True))
    ending = _ending(training[0].images[0].name) if training else ".nii.gz"
    return RawDataset(root, "decathlon", channel_names, labels, ending, _unique_ids(training), _unique_ids(test))


def _check_keys(jpath: Path, meta: dict, is_v2: bool) -> None:
    """Missing required keys are an error (suggesting a present near miss such as 'chanel_names');
    unknown keys are ignored with one warning each; keys medvol cannot honour are refused."""
    required = NNUNET_V2_KEYS if is_v2 else DECATHLON_KEYS
    unknown = sorted(set(meta) - KNOWN_KEYS)
    missing = sorted(required - set(meta))
    if missing:
        kind = "nnU-Net v2" if is_v2 else "Decathlon"
        hints = "".join(f"; found '{close[0]}': did you mean '{m}'?" for m in missing
                        if (close := difflib.get_close_matches(m, unknown, n=1, cutoff=0.8)))
        raise InputError(jpath, f"missing key(s) {missing} required by the {kind} layout{hints}")
    for key in unknown:
        _warn_once(jpath, key)
    for key, why in REFUSED_KEYS.items():
        if key in meta:
            raise InputError(jpath, f"'{key}': {why}")


_warned: set[tuple[str, str]] = set()  # a dataset is opened more than once per command: warn once


def _warn_once(jpath: Path, key: str) -> None:
    if (str(jpath.resolve()), key) in _warned:
        return
    _warned.add((str(jpath.resolve()), key))
    close = difflib.get_close_matches(key, sorted(KNOWN_KEYS), n=1, cutoff=0.8)
    log.warning("%s: unknown key '%s' ignored%s", jpath, key, f" (did you mean '{close[0]}'?)" if close else "")


def _check_reader(jpath: Path, meta: dict) -> None:
    """Honour ``overwrite_image_reader_writer`` where medvol reads as that nnU-Net class does, else refuse."""
    key, reader = "overwrite_image_reader_writer", meta.get("overwrite_image_reader_writer", "None")
    if reader not in SAME_READERS:
        why = READER_REFUSALS.get(reader, "medvol reads NIfTI (nibabel), MetaImage/NRRD (SimpleITK) and DICOM "
                                          "with its own readers, as 'SimpleITKIO' and 'NibabelIO' do")
        raise InputError(jpath, f"'{key}': {reader!r} is not supported: {why}")
    endings, ending = SAME_READERS[reader], meta.get("file_ending")
    if endings is not None and ending is not None and ending not in endings:
        raise InputError(jpath, f"'{key}': {reader!r} reads {' and '.join(endings)} files, "
                                f"but file_ending is {ending!r}")


def _unique_ids(cases: list[RawCase]) -> list[RawCase]:
    """Refuse two sources that map to one case id (``a/x.nii.gz`` and ``b/x.nii.gz``, or
    ``x.nii`` and ``x.nii.gz``), naming both: one would silently replace the other."""
    seen: dict[str, RawCase] = {}
    for c in cases:
        other = seen.setdefault(c.case_id, c)
        if other is not c:
            raise InputError(c.images[0], f"maps to the same case id '{c.case_id}' as {other.images[0]}: "
                                          "rename one of them")
    return cases


# Expected JSON types of dataset.json keys (nnU-Net v2 and Decathlon); absent optional keys pass.
JSON_TYPES: dict[str, tuple[type | tuple[type, ...], str]] = {
              "channel_names": (dict, "a mapping channel -> name"), "modality": (dict, "a mapping channel -> name"),
              "labels": (dict, "a mapping"), "numTraining": (int, "an integer"), "numTest": (int, "an integer"),
              "file_ending": (str, "a string such as \".nii.gz\""), "training": (list, "a list"),
              "test": (list, "a list"), "labelled_cases": (list, "a list of case ids"),
              "case_tasks": (dict, "a mapping"), "tasks": ((dict, type(None)), "a mapping"),
              "overwrite_image_reader_writer": (str, "a reader class name such as \"SimpleITKIO\"")}


def _check_types(jpath: Path, meta: dict) -> None:
    for key, (tp, what) in JSON_TYPES.items():
        v = meta.get(key)
        if key in meta and (not isinstance(v, tp) or isinstance(v, bool)):
            raise InputError(jpath, f"'{key}' must be {what}, got {type(v).__name__} {v!r:.60}")
    ending = meta.get("file_ending")
    if ending is not None and not (ending.startswith(".") and len(ending) > 1):
        raise InputError(jpath, f"'file_ending' must start with a dot (e.g. \".nii.gz\"), got {ending!r}")
    if "labelled_cases" in meta and not all(isinstance(c, str) for c in meta["labelled_cases"]):
        raise InputError(jpath, "'labelled_cases' must be a list of case ids (strings)")


def _channel_names(jpath: Path, channels: dict, key: str) -> dict[int, str]:
    out = {}
    for k, v in channels.items():
        if not k.isdigit() or not isinstance(v, str):
            raise InputError(jpath, f"'{key}' maps channel numbers to names (e.g. {{\"0\": \"CT\"}}), "
                                    f"got {k!r}: {v!r}")
        out[int(k)] = v
    if sorted(out) != list(range(len(out))) or not out:
        raise InputError(jpath, f"{key} keys must be 0..N-1, got {sorted(out)}")
    return out


def _v2_cases(root: Path, img_dir: str, lab_dir: str, ending: str, n_channels: int, jpath: Path,
              labels_optional: bool = False, labelled: list | None = None,
              raters: list[str] | None = None) -> list[RawCase]:
    """The cases of one images/labels folder pair. A label file is required unless
    ``labels_optional``, or unless the dataset declares ``labelled_cases`` (a semi-supervised
    split) and the case is not among them: such a case is unlabelled training data. With
    ``raters`` a case's label is one file per rater, ``<case>_r<k><ending>`` (k = 0, 1, ...)."""
    idir = root / img_dir
    if not idir.is_dir():
        if labels_optional:
            return []
        raise InputError(idir, "missing images folder of the nnU-Net v2 layout")
    by_case: dict[str, dict[int, Path]] = {}
    for p in sorted(idir.iterdir()):
        if not p.name.endswith(ending) or p.name.startswith("."):
            continue
        split = split_channel(p.name[: -len(ending)])
        if split is None:
            raise InputError(p, f"image names must be <case>_<cccc>{ending} (channel as 4 digits)")
        by_case.setdefault(split[0], {})[split[1]] = p
    cases = []
    for case, chans in sorted(by_case.items()):
        problem = None
        missing = [c for c in range(n_channels) if c not in chans]
        extra = sorted(set(chans) - set(range(n_channels)))
        lab = root / lab_dir / f"{case}{ending}"
        rater_files = rater_label_files(root / lab_dir, case, ending, raters)
        if rater_files is not None:
            lab = rater_files[0]
        if missing:
            problem = InputError(idir / f"{case}_{missing[0]:04d}{ending}",
                                 f"case '{case}' is missing channel file(s) {missing}")
        elif extra:
            problem = InputError(chans[extra[0]], f"channel {extra[0]} is not declared in channel_names")
        may_lack_label = labels_optional or (labelled is not None and case not in labelled)
        absent = [p for p in rater_files or [lab] if not p.exists()]
        if rater_files is not None and absent and len(absent) < len(rater_files) and problem is None:
            problem = InputError(absent[0], f"case '{case}' has labels of some raters but not of "
                                            f"{[p.name for p in absent]}: every rater labels every case")
        if absent and not may_lack_label and problem is None:
            problem = InputError(absent[0], f"label file of case '{case}' is missing")
        cases.append(RawCase(case, [chans.get(c, idir / f"{case}_{c:04d}{ending}") for c in range(n_channels)],
                             lab if not absent else None, problem=problem,
                             rater_labels=rater_files if not absent else None))
    return cases


RATER_SUFFIX = "_r{k}"  # labelsTr/<case>_r<k><ending>: rater k's label (k as dataset.json's "raters" lists them)


def rater_label_files(folder: Path, case: str, ending: str, raters: list[str] | None) -> list[Path] | None:
    """The label files of ``case``'s raters in ``folder`` (None: not a multi-rater dataset)."""
    if raters is None:
        return None
    return [folder / f"{case}{RATER_SUFFIX.format(k=k)}{ending}" for k in range(len(raters))]


@dataclass
class LoadedCase:
    image: np.ndarray  # (C, X, Y, Z), C-ordered: float32, or the file's small integer dtype
    label: np.ndarray | None  # (1, X, Y, Z) int8 (int16 for labels above 127); (R, X, Y, Z): one per rater
    reference: Volume  # first channel's geometry as stored in its file (its array a zero-byte stand-in)
    affine: np.ndarray | None = None  # the arrays' affine when reoriented (else the reference's)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along the arrays' axes (after any reorientation)."""
        return spacing_from_affine(self.reference.affine if self.affine is None else self.affine)

    def orientation_properties(self) -> dict:
        """What :func:`medvol.inference.restore_geometry` needs to undo a reorientation."""
        if self.affine is None:
            return {}
        return {"orientation": "RAS", "oriented_shape": [int(s) for s in self.image.shape[1:]]}


def load_raw_case(case: RawCase, dataset: RawDataset, check_labels: bool = True,
                  orientation: str | None = None) -> LoadedCase:
    """Read and validate one case: channels present and agreeing in shape and affine with
    each other and the label, intensities finite, label values declared. With
    ``orientation="RAS"`` the arrays come back in RAS voxel order (``LoadedCase.affine``)."""
    if case.problem is not None:
        raise case.problem
    ref, channels = None, []
    for p in case.images:  # each file's own array is let go once copied (C-ordered) into the case
        v = read_volume(p)
        if ref is None:
            ref = _geometry_only(v)
        _check_geometry(p, v, case.images[0], ref)
        channels.append(v.channel_first(_kept_dtype(v.array.dtype)))
        del v
    assert ref is not None
    image = np.concatenate(channels) if len(channels) > 1 else channels[0]
    if image.shape[0] != dataset.num_channels and dataset.layout not in ("nifti_folder", "dicom_tree"):
        raise InputError(case.images[0], f"holds {image.shape[0]} channel(s), dataset.json declares "
                                         f"{dataset.num_channels}")
    finite = np.isfinite(image) if image.dtype.kind == "f" else np.ones((), bool)
    if not finite.all():
        c = int(np.argwhere(~finite)[0][0])
        bad = int((~finite).sum())
        raise InputError(case.images[min(c, len(case.images) - 1)],
                         f"{bad} non-finite intensity value(s) (NaN/inf) in channel {c}")
    label = None
    if case.label is not None:
        declared = dataset.label_values if check_labels else None
        files = case.rater_labels or [case.label]
        label = np.concatenate([_read_label(p, case.images[0], ref, declared) for p in files])
    if orientation in (None, "stored"):
        return LoadedCase(image, label, ref)
    image, affine = orient_channels(image, ref.affine, orientation)
    label = None if label is None else orient_channels(label, ref.affine, orientation)[0]
    return LoadedCase(image, label, ref, affine)


def _read_label(path: Path, ref_path: Path, ref: Volume, declared: list[int] | None) -> np.ndarray:
    """One label file as ``(1, X, Y, Z)``, checked: 3D, on the image's grid, values declared."""
    lv = read_volume(path)
    if lv.array.ndim != 3:
        raise InputError(path, f"label must be a 3D image, got shape {lv.array.shape}")
    _check_geometry(path, lv, ref_path, ref)
    return _label_array(path, np.asarray(lv.array), declared)[None]


def _geometry_only(v: Volume) -> Volume:
    """``v`` with a zero-byte stand-in of the same shape and dtype for its array."""
    return Volume(np.broadcast_to(np.zeros((), v.array.dtype), v.array.shape), v.affine, v.meta)


def _kept_dtype(dtype: np.dtype) -> np.dtype | None:
    """Small integer scans (CT's int16, MRI's uint8/int16) stay in their dtype until
    normalisation (half the bytes through cropping, fingerprint and staging); others float32."""
    return None if dtype.kind in "iu" and dtype.itemsize <= 2 else np.dtype(np.float32)


def _values_present(lab: np.ndarray) -> np.ndarray:
    """``np.unique(lab)``; for small integer dtypes by counting (no sort of the volume)."""
    if lab.dtype.kind in "iu" and lab.dtype.itemsize <= 2 and lab.size:
        lo = int(np.iinfo(lab.dtype).min)
        flat = lab.ravel(order="K")  # a view for C- or F-ordered volumes
        counts = np.zeros(1 << (8 * lab.dtype.itemsize), np.int64)
        for i in range(0, flat.size, 1 << 22):  # in chunks: bincount takes intp (8 bytes a voxel)
            counts += np.bincount(flat[i:i + (1 << 22)].astype(np.int64) - lo, minlength=counts.size)
        return (np.flatnonzero(counts) + lo).astype(lab.dtype)
    return np.unique(lab)


def _label_array(path: Path, lab: np.ndarray, declared: list[int] | None) -> np.ndarray:
    """``lab`` as C-ordered int8 (int16 for values above 127), after checking its values in the
    file's own dtype (a cast first would turn 65538 into 2 and 1e10 into 0): integers, and
    declared when ``declared`` is given."""
    if declared is not None and lab.dtype.kind in "iu" and lab.size:
        lo, hi = int(lab.min()), int(lab.max())
        if set(range(lo, hi + 1)) <= set(declared):  # every value declared: no need to list them
            return c_order(lab, np.int8 if hi <= np.iinfo(np.int8).max else np.int16)
    present = _values_present(lab)
    if not np.issubdtype(lab.dtype, np.integer):
        if not np.all(np.isfinite(present)) or not np.array_equal(present, np.round(present)):
            bad = present[~np.isfinite(present) | (present != np.round(present))]
            raise InputError(path, f"label values must be integers, found {bad[:5].tolist()}")
    values = [int(v) if abs(v) < 2**62 else float(v) for v in present.tolist()]
    allowed = set(declared) if declared is not None else set(range(np.iinfo(np.int16).max + 1))
    undeclared = sorted(v for v in values if v not in allowed)
    if undeclared:
        where = f"declared: {declared}" if declared is not None else "labels are 0..32767"
        raise InputError(path, f"label value(s) {undeclared[:10]} are not declared in dataset.json ({where})")
    return c_order(lab, np.int8 if max(values, default=0) <= np.iinfo(np.int8).max else np.int16)


def _check_geometry(path: Path, vol: Volume, ref_path: Path, ref: Volume) -> None:
    if vol.spatial_shape != ref.spatial_shape:
        raise InputError(path, f"shape {vol.spatial_shape} differs from {ref_path.name}'s {ref.spatial_shape}")
    # nnU-Net's tolerance: direction/origin/spacing equal to about 1e-4 relative.
    if not np.allclose(vol.affine, ref.affine, rtol=1e-4, atol=1e-3):
        diff = float(np.abs(vol.affine - ref.affine).max())
        raise InputError(path, f"affine differs from {ref_path.name}'s by up to {diff:.4g} (mm or direction "
                               f"cosine): not on the same voxel grid; origin {np.round(vol.affine[:3, 3], 3).tolist()} "
                               f"vs {np.round(ref.affine[:3, 3], 3).tolist()}")
