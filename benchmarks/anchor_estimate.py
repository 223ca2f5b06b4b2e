"""How well do the class anchors estimate a target site's class means from K unlabelled
references? (``synth align --class-anchor-weight``, :mod:`medflow.synthesis.anchors`.)

    python benchmarks/anchor_estimate.py --synth-model STAGE1/synth.pt \\
        --target site-b=DATA_B site-c=DATA_C --segmenter augmented=CKPT [source=CKPT ...] \\
        [--ks 1 5 10] [--results benchmarks/results/anchor_estimate.json]

For every target (a dataset the builtin ``mni152-tissue-shifted`` / ``-site-c`` writes: its
``dataset.json`` names each reference's labelled training slab and slice) and every K, the
first K references are read as ``synth align`` reads them (the stage-1 model's
preprocessing, as the segmenter sees them) and their class means over the tissue are
computed three ways: under their true labels (the truth, which the alignment never sees),
by the fixed-share mixture (:meth:`ClassAnchors.from_mixture`, shares and starting means
from the real source slices) and under each segmenter's labels
(:meth:`ClassAnchors.from_labels`, :func:`medflow.synthesis.align.segmenter_labels`). The
table gives every estimate's class means, its gap between the two brightest classes (white
minus grey for the brain) and its root-mean-square error against the truth.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from medflow.data.builtin import REFERENCE_SLICES
from medflow.data.datasets import load_slices, prepare_image
from medflow.data.io import read_image
from medflow.data.layout import load_dataset
from medflow.synthesis.align import read_references, segmenter_probs
from medflow.synthesis.anchors import ClassAnchors, class_means, estimate_anchors, slice_shares
from medflow.synthesis.model import SynthModel
from medflow.synthesis.sample import source_slices
from medflow.synthesis.view import segmenter_view


def named(items: list[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"{item!r}: expected NAME=PATH")
        out[name] = Path(path)
    return out


def reference_labels(target: Path, model: SynthModel, k: int) -> torch.Tensor:
    """The true labels ``(n, H, W)`` of the reference slices of the first ``k`` reference
    files, prepared as their images: each file is a labelled training slab
    (``dataset.json``'s ``medflow.references`` names it), its slices those ``slices.json``
    names."""
    records = json.loads((target / "dataset.json").read_text())["medflow"]["references"]
    chosen = json.loads((target / "references" / REFERENCE_SLICES).read_text())["slices"]
    spec = load_dataset(target)
    cases = {c.case_id: c for c in spec.training}
    axis = model.prep.slice_axis
    out = []
    for ref in sorted(records, key=lambda r: r["file"])[:k]:
        path = target / ref["file"]
        _, box = prepare_image(read_image([path]), model.prep)
        slices = load_slices([cases[ref["case"]]], model.prep, spec.num_classes)
        out += [slices.masks[z - box[axis].start] for z in chosen[path.name]]
    return torch.stack(out)


def source_batch(source: Path, model: SynthModel):
    """The real source slices as the segmenter sees them: the mixture's shares and start."""
    slices = source_slices(source, model)
    view, fg = segmenter_view(
        slices.images, model.background_level, model.prep.schemes, model.file_ending
    )
    return view, fg, slices.masks


TEMPERATURES = (1.0, 0.5, 0.25)  # the segmenter's probabilities as a prior, p^tau


def em(values: list[torch.Tensor], prior: torch.Tensor, init: torch.Tensor) -> torch.Tensor:
    """Per channel, :func:`estimate_anchors` with a per-pixel prior."""
    return torch.stack([estimate_anchors(v, prior, init[c]) for c, v in enumerate(values)])


def estimates(target: Path, model: SynthModel, batch, segmenters: dict, k: int) -> dict:
    refs = read_references(target / "references", model.prep, k)
    labels = reference_labels(target, model, k)
    n_classes = max(model.labels.values()) + 1
    truth, _ = class_means(refs.images, refs.foreground, labels, n_classes)
    tissue = refs.foreground[:, 0]
    values = [refs.images[:, c][tissue] for c in range(refs.images.shape[1])]
    got = {"truth": truth, "mixture": ClassAnchors.from_mixture(values, *batch, n_classes).anchors}
    init, shares = class_means(batch[0], batch[1], batch[2], n_classes)
    for name, ckpt in segmenters.items():
        probs = segmenter_probs(ckpt, refs.images, n_classes, "cpu")
        pseudo = probs.argmax(1)
        agree = float((pseudo == labels)[tissue].float().mean())
        ref_batch = (refs.images, refs.foreground, pseudo)
        anchors = ClassAnchors.from_labels(ref_batch, *batch, n_classes).anchors
        got[f"labels by {name}"] = (anchors, agree)
        per_slice = slice_shares(refs.foreground, pseudo, n_classes)
        got[f"EM, slice shares by {name}"] = (em(values, per_slice, init), agree)
        for tau in TEMPERATURES:
            prior = probs.permute(0, 2, 3, 1)[tissue].double().clamp_min(1e-6) ** tau
            prior = prior / prior.sum(1, keepdim=True)
            got[f"EM, prior {name}^{tau:g}"] = (em(values, prior, init), agree)
    names = sorted(model.labels, key=model.labels.get)
    top = truth[0, 1:].argsort()[-2:] + 1  # the two brightest label classes, by the truth
    rows = {}
    for name, value in got.items():
        means, agree = value if isinstance(value, tuple) else (value, None)
        rows[name] = {
            "class_means": {n: round(float(m), 3) for n, m in zip(names, means[0], strict=True)},
            "gap": round(float(means[0, top[1]] - means[0, top[0]]), 3),
            "rmse": round(float((means - truth).pow(2).mean().sqrt()), 3),
            "tissue_agreement": None if agree is None else round(agree, 3),
        }
    return rows


def markdown(results: dict) -> str:
    lines = [
        "| target | K | estimate | class means | gap | RMSE vs truth | labels agree |",
        "|---|---|---|---|---|---|---|",
    ]
    for target, by_k in results.items():
        for k, rows in by_k.items():
            for name, r in rows.items():
                means = ", ".join(f"{n} {m:+.2f}" for n, m in r["class_means"].items())
                agree = "" if r["tissue_agreement"] is None else f"{r['tissue_agreement']:.3f}"
                lines.append(
                    f"| {target} | {k} | {name} | {means} | {r['gap']:+.2f} | {r['rmse']:.3f} "
                    f"| {agree} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--synth-model", type=Path, required=True, help="stage-1 synth.pt")
    ap.add_argument("--source", type=Path, required=True, help="its labelled source dataset")
    ap.add_argument("--target", nargs="+", required=True, help="NAME=DATASET")
    ap.add_argument("--segmenter", nargs="*", default=[], help="NAME=medflow train checkpoint")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10])
    ap.add_argument("--results", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = SynthModel.load(args.synth_model, "cpu")
    batch = source_batch(args.source, model)
    segmenters = named(args.segmenter)
    results = {
        name: {str(k): estimates(folder, model, batch, segmenters, k) for k in args.ks}
        for name, folder in named(args.target).items()
    }
    table = markdown(results)
    print(table)
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=2) + "\n")
        args.results.with_suffix(".md").write_text(table)


if __name__ == "__main__":
    main()
