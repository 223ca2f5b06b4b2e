"""Which of the reward encoder's feature groups sees the simulated sites (AlignFlow issue 14)?

    python benchmarks/reward_features.py            # ~10 s on one thread

builds ``mni152-tissue`` and ``mni152-tissue-shifted`` (or reads ``--data``), reads every
training slice of both sites as the segmenter sees a scan (``synth align``'s
:func:`~medflow.synthesis.align.read_references`: cropped and z-scored per slab, the tissue
foreground above the slab's zero level), at the synthesis model's default 64 x 64, and also
the source's training slabs through site-c's shift and through each component of either
shift alone (``apply_shift`` seeded per slab as the builtins are). For every site and every
feature group alone (and the default and all groups together) it reports

    ratio = between / within,
    between = mean of MMD^2(source half a, site half b) and MMD^2(source half b, site half a),
    within  = mean of MMD^2(source a, source b) and MMD^2(site a, site b),

with halves a, b the even and odd training slabs (different anatomy in every pair) and the
features standardised and the kernel widths set exactly as ``synth align``'s reward does
(:class:`~medflow.synthesis.reward.MMDReward` calibrated on the source slices, the site's
slices as references). A ratio near 1: the group cannot tell the site from other anatomy.
Writes ``reward_features.json`` and ``reward_features.md`` into ``--results``.

With ``--segmenter CKPT`` (a source segmenter trained on ``mni152-tissue``: a UNet or a flow
network with an image branch), the ``"segmenter"`` group of its first ``--segmenter-levels``
levels (:func:`medflow.segmentation.features.early_features`) is measured too, alone and
added to the default groups.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SIZE = 64  # SynthConfig's default size: the resolution the reward works at


@dataclass(frozen=True)
class Site:
    """A target site: its name and the AcquisitionShift fields it changes from no shift
    (None: the builtin ``mni152-tissue-shifted``, site-b as built)."""

    name: str
    shift: dict | None = None


NO_SHIFT = {"gamma": 1.0, "bias_strength": 0.0, "noise_std": 0.0, "downsample": 1}
# site-c's fields as medflow.data.shift.SITES["site-c"] sets them (kept literal so that this
# module imports without medflow; a check in read_sites compares them)
SITE_C = {
    **NO_SHIFT,
    "remap_peak": 0.95,
    "kspace_fraction": 0.5,
    "ghost_phase": 0.6,
    "ghost_period": 4,
    "rician_std": 0.03,
}
SITES = (
    Site("site-b"),
    Site("gamma 0.5", {**NO_SHIFT, "gamma": 0.5}),
    Site("bias 0.3", {**NO_SHIFT, "bias_strength": 0.3}),
    Site("2x in-plane", {**NO_SHIFT, "downsample": 2}),
    Site("noise 8%", {**NO_SHIFT, "noise_std": 0.08}),
    # site-c (medflow.data.shift.SITES["site-c"]) and each of its components alone
    Site("site-c", SITE_C),
    Site("remap 0.95", {**NO_SHIFT, "remap_peak": SITE_C["remap_peak"]}),
    Site("ringing 0.5", {**NO_SHIFT, "kspace_fraction": SITE_C["kspace_fraction"]}),
    Site(
        "ghosts 0.6",
        {**NO_SHIFT, "ghost_phase": SITE_C["ghost_phase"], "ghost_period": SITE_C["ghost_period"]},
    ),
    Site("rician 3%", {**NO_SHIFT, "rician_std": SITE_C["rician_std"]}),
)


def selections(segmenter: bool = False) -> dict[str, tuple[str, ...]]:
    """The feature selections measured, by display name; with ``segmenter``, also the
    ``"segmenter"`` group alone and the default groups with it."""
    from medflow.synthesis.config import DEFAULT_REWARD_FEATURES, REWARD_FEATURES

    chosen = {
        **{name: (name,) for name in REWARD_FEATURES},
        "default (moments+histogram+style)": DEFAULT_REWARD_FEATURES,
        "default+lowfreq": (*DEFAULT_REWARD_FEATURES, "lowfreq"),
        "moments+laplacian+lowfreq": ("moments", "laplacian", "lowfreq"),
        "all six": REWARD_FEATURES,
    }
    if segmenter:
        chosen["segmenter"] = ("segmenter",)
        chosen["default+segmenter"] = (*DEFAULT_REWARD_FEATURES, "segmenter")
    return chosen


def shifted_copy(images: Path, out: Path, shift: dict) -> Path:
    """``images``' slabs through ``AcquisitionShift(**shift)``, seeded by slab index as
    ``mni152-tissue-shifted`` is, written with the same names into ``out``."""
    import nibabel as nib
    import numpy as np

    from medflow.data.shift import AcquisitionShift, apply_shift

    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(images.glob("*.nii.gz")):
        img = nib.load(path)
        slab = int(re.search(r"slab(\d+)", path.name).group(1))
        array = apply_shift(
            img.get_fdata(dtype=np.float32), AcquisitionShift(**shift), np.random.default_rng(slab)
        )
        nib.save(nib.Nifti1Image(array, img.affine), str(out / path.name))
    return out


def file_of_rows(files: list[str], prep):
    """``(N,)`` index of the file each slice of ``read_references(...).images`` came from
    (it concatenates the files' slices in ``files``' order)."""
    import torch

    from medflow.data.datasets import prepare_image
    from medflow.data.io import read_image

    counts = [len(prepare_image(read_image([f]), prep)[0]) for f in files]
    return torch.cat([torch.full((n,), i) for i, n in enumerate(counts)])


def sensitivity(features, source, site, rows_a, rows_b, extractor=None) -> dict:
    """``between``, ``within`` and their ratio for one feature selection (module docstring);
    ``extractor`` is the segmenter's, used by a selection with ``"segmenter"``."""
    import torch

    from medflow.metrics.distribution import mmd2
    from medflow.synthesis.reward import FeatureEncoder, MMDReward

    encoder = FeatureEncoder(
        source.images.shape[1],
        features=features,
        extractor=extractor if "segmenter" in features else None,
    )
    with torch.no_grad():
        reward = MMDReward(
            encoder,
            site.images,
            ref_mask=site.foreground,
            scale_from=source.images,
            scale_mask=source.foreground,
        )
        t0 = time.process_time()
        fs = reward.features(source.images, source.foreground)
        seconds = time.process_time() - t0
        ft = reward.features(site.images, site.foreground)
        bw = reward.bandwidths

        def d(x, y):
            return float(mmd2(x, y, bw))

        between = (d(fs[rows_a], ft[rows_b]) + d(fs[rows_b], ft[rows_a])) / 2
        within = (d(fs[rows_a], fs[rows_b]) + d(ft[rows_a], ft[rows_b])) / 2
    return {
        "between": between,
        "within": within,
        "ratio": between / within,
        "dim": encoder.feature_dim,
        "encode_cpu_s": seconds,
    }


def read_sites(data: Path, tmp: Path) -> tuple:
    """The source's and every site's training slices as the segmenter sees them, the
    slab index of each slice, and a check of the per-component copies."""
    from medflow.data.builtin import build
    from medflow.data.datasets import plan_preprocessing
    from medflow.data.layout import load_dataset
    from medflow.data.shift import SITES as SHIFT_SITES
    from medflow.synthesis.align import read_references

    src, tgt = data / "mni152", data / "mni152-shifted"
    for name, path in (("mni152-tissue", src), ("mni152-tissue-shifted", tgt)):
        if not (path / "dataset.json").exists():
            build(name, path)
    spec = load_dataset(src)
    prep = plan_preprocessing(spec, spec.training, (SIZE, SIZE), None)
    source = read_references(src / "imagesTr", prep, None)
    sites = {}
    for site in SITES:
        folder = tgt / "imagesTr"
        if site.shift is not None:
            folder = shifted_copy(src / "imagesTr", tmp / site.name, site.shift)
        sites[site.name] = read_references(folder, prep, None)
    fields = dataclasses.asdict(SHIFT_SITES["site-c"])
    assert all(fields[k] == v for k, v in SITE_C.items()), "SITE_C differs from the builtin's"
    # the per-component copies are made as the builtin makes site-b: check that way
    rebuilt = read_references(shifted_copy(src / "imagesTr", tmp / "rebuilt", {}), prep, None)
    diff = float((rebuilt.images - sites["site-b"].images).abs().max())
    slab = file_of_rows(source.files, prep)
    # the shift keeps each slab's nonzero set, so every site has the source's slices
    assert all(len(s.images) == len(slab) for s in sites.values())
    return source, sites, slab, {"rebuilt_site_b_max_abs_diff": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, help="folder for (or with) the two built datasets")
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    ap.add_argument(
        "--segmenter",
        type=Path,
        metavar="CKPT",
        help="a source segmenter checkpoint (trained on mni152-tissue): also measure its "
        "early features (the 'segmenter' group)",
    )
    ap.add_argument(
        "--segmenter-levels", type=int, default=2, help="levels of its features (default: 2)"
    )
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    t_start = time.process_time()
    extractor = None
    if args.segmenter is not None:
        from medflow.segmentation.features import early_features

        extractor = early_features(args.segmenter, args.segmenter_levels)
    with tempfile.TemporaryDirectory() as tmp:
        source, sites, slab, check = read_sites(args.data or Path(tmp), Path(tmp))
    rows_a, rows_b = slab % 2 == 0, slab % 2 == 1
    table = {
        name: {s: sensitivity(feats, source, sites[s], rows_a, rows_b, extractor) for s in sites}
        for name, feats in selections(extractor is not None).items()
    }
    record = {
        "what": "MMD^2 between source and target-site slices over MMD^2 within a site, per "
        "feature group alone, scaled as synth align's reward (benchmarks/reward_features.py)",
        "size": SIZE,
        "slices_per_site": len(source.images),
        "files": [Path(f).name for f in source.files],
        "halves": "even / odd training slabs",
        "sites": {s.name: s.shift or "mni152-tissue-shifted as built" for s in SITES},
        "check": check,
        "groups": table,
        "cpu_seconds": time.process_time() - t_start,
        "threads": torch.get_num_threads(),
    }
    if extractor is not None:
        record["segmenter"] = {"checkpoint": str(args.segmenter), "levels": extractor.levels}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "reward_features.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.results / "reward_features.md").write_text(markdown(record))
    print(markdown(record))


def markdown(record: dict) -> str:
    sites = list(record["sites"])
    lines = [
        f"Sensitivity of each reward feature group to a site ({record['slices_per_site']} "
        f"training slices per site, {record['size']} x {record['size']}, halves: "
        f"{record['halves']}): between-site MMD^2 / within-site MMD^2 (1 = blind).",
        "",
        "| features | dim | " + " | ".join(sites) + " |",
        "|---|---|" + "---|" * len(sites),
    ]
    for name, row in record["groups"].items():
        cells = " | ".join(f"{row[s]['ratio']:.2f}" for s in sites)
        lines.append(f"| {name} | {row[sites[0]]['dim']} | {cells} |")
    lines.append("")
    if "segmenter" in record:
        seg = record["segmenter"]
        lines.append(f"segmenter: the first {seg['levels']} level(s) of {seg['checkpoint']}.")
    lines.append(f"{record['cpu_seconds']:.1f} CPU s, {record['threads']} thread(s).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
