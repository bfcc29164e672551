"""Pictures a person would rather look at: per-case PNGs with outlines, and an index.html."""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np

from medvol.manifest import claim_files
from medvol.utils import write_text

COLOURS = ["#ff3b30", "#34c759", "#0a84ff", "#ffd60a", "#bf5af2", "#ff9f0a", "#64d2ff", "#ff375f"]


def _canonical(vol):
    """Array reoriented to RAS (nibabel's closest canonical) for display."""
    import nibabel as nib

    img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(vol.array), vol.affine))
    return np.asarray(img.dataobj), img.header.get_zooms()[:3]


def case_picture(image_vol, pred_vol, out_png: str | Path, ref_vol=None, title: str = "",
                 names: dict[int, str] | None = None, ignore: int | None = None) -> Path:
    """Axial, coronal and sagittal slices through the structure's centre: prediction outlines
    as thin lines, the reference (when given) as broad translucent ones, over the image.
    ``ignore``: the reference's ignore label (sparse annotations), drawn as no class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    img, zooms = _canonical(image_vol)
    if img.ndim == 4:
        img = img[..., 0]
    pred, _ = _canonical(pred_vol)
    ref = _canonical(ref_vol)[0] if ref_vol is not None else None
    fg = (ref if ref is not None else pred) > 0
    if ref is not None and ignore is not None:
        fg &= ref != ignore
    centre = np.round(np.argwhere(fg).mean(0)).astype(int) if fg.any() else np.array(img.shape) // 2
    classes = sorted(set(np.unique(pred).tolist()) | (set(np.unique(ref).tolist()) if ref is not None else set()))
    classes = [c for c in classes if c > 0 and c != ignore]
    lo, hi = np.percentile(img, [0.5, 99.5])
    views = [(name, axis) for name, axis in (("axial", 2), ("coronal", 1), ("sagittal", 0))  # 2D images: one view
             if min(n for i, n in enumerate(img.shape[:3]) if i != axis) > 1]
    fig, axes = plt.subplots(1, len(views), figsize=(4 * len(views), 4.4), dpi=100, squeeze=False)
    axes = axes[0]
    for ax, (name, axis) in zip(axes, views):
        def take(a, axis=axis):  # the slice through the centre; rows = next axis up
            return np.take(a, centre[axis], axis=axis).T

        other = [zooms[i] for i in range(3) if i != axis]
        ax.imshow(take(img), cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=other[1] / other[0])
        for i, c in enumerate(classes):
            col = COLOURS[i % len(COLOURS)]
            if ref is not None and (take(ref) == c).any():  # reference: broad, translucent, underneath
                ax.contour(take(ref) == c, levels=[0.5], colors=[col], linewidths=3.0, alpha=0.4)
            if (take(pred) == c).any():
                ax.contour(take(pred) == c, levels=[0.5], colors=[col], linewidths=1.0)
        ax.set_title(f"{name} {centre[axis]}")
        ax.axis("off")
    handles = [Line2D([0], [0], color=COLOURS[i % len(COLOURS)], lw=2, label=(names or {}).get(c, f"class {c}"))
               for i, c in enumerate(classes)]
    if ref is not None:
        handles.append(Line2D([0], [0], color="white", lw=3, alpha=0.4, label="reference (broad)"))
    if handles:  # nothing found and no reference: no legend (matplotlib refuses ncol=0)
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, facecolor="#222",
                   labelcolor="white", frameon=True)
    fig.suptitle(title)
    fig.patch.set_facecolor("#111")
    for ax in axes:
        ax.title.set_color("white")
    fig.suptitle(title, color="white")
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, facecolor=fig.get_facecolor())
    plt.close(fig)
    return out_png


def write_index(out_dir: str | Path, pictures: dict[str, str], metrics: dict | None = None,
                title: str = "medvol report") -> Path:
    """``index.html`` listing each case with its metrics and picture."""
    out_dir = Path(out_dir)
    rows = []
    summary_html = ""
    if metrics:
        summary = metrics["summary"]
        summary_html = "<h2>Summary (mean ± std)</h2><table><tr><th>class</th><th>Dice</th><th>Jaccard</th>" \
                       "<th>HD95 (mm)</th><th>ASD (mm)</th></tr>" + "".join(
                           f"<tr><td>{html.escape(c)}</td>" + "".join(
                               f"<td>{_fmt(s[k]['mean'])} ± {_fmt(s[k]['std'])}</td>"
                               for k in ("dice", "jaccard", "hd95", "asd"))
                           + "</tr>" for c, s in summary.items()) + "</table>"
    for case, png in sorted(pictures.items()):
        cells = ""
        if metrics and case in metrics["cases"]:
            cells = "<br>".join(f"{html.escape(c)}: Dice {_fmt(m['dice'])}, HD95 {_fmt(m['hd95'])} mm"
                                for c, m in metrics["cases"][case].items())
        rows.append(f"<tr><td><b>{html.escape(case)}</b><br>{cells}</td>"
                    f"<td><a href='{html.escape(png)}'><img src='{html.escape(png)}' width='720'></a></td></tr>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;background:#fafafa}td{vertical-align:top;padding:6px}"
            "table{border-collapse:collapse}th,td{border-bottom:1px solid #ddd}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{summary_html}<h2>Cases</h2><table>{''.join(rows)}</table></body></html>")
    path = out_dir / "index.html"
    write_text(path, page)
    return path


def _fmt(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def write_report(out_dir: str | Path, cases: dict[str, tuple], metrics: dict | None = None,
                 names: dict[int, str] | None = None, title: str = "medvol report", ignore: int | None = None) -> Path:
    """Pictures of ``cases`` ({case: (image source, prediction file, reference file or None)})
    in ``out_dir/pictures`` and ``out_dir/index.html``; returns the index path."""
    from medvol.io import read_volume

    out_dir = Path(out_dir)
    claim_files(out_dir, ["pictures", "index.html"])
    pictures = {}
    for case, (image_src, pred, ref) in sorted(cases.items()):
        png = out_dir / "pictures" / f"{case}.png"
        dice = ""
        if metrics and case in metrics["cases"]:
            dice = "  Dice " + ", ".join(f"{c} {m['dice']:.3f}" for c, m in metrics["cases"][case].items())
        case_picture(read_volume(image_src), read_volume(pred), png, read_volume(ref) if ref else None,
                     title=case + dice, names=names, ignore=ignore)
        pictures[case] = str(png.relative_to(out_dir))
    return write_index(out_dir, pictures, metrics, title)
