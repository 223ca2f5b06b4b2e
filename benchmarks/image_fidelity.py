"""How close are stage-1 images to real ones, and can a segmenter learn from them alone?
(AlignFlow issue 14: "the generated images are farther from the target than the real source
images are", so is the image flow the weaker half?)

    python benchmarks/image_fidelity.py --synth-model runs/af/synth/stage1/synth.pt \\
        --out runs/fidelity                       # ~40 CPU-minutes on one thread

For every training mask of the labelled source (each slice once), the stage-1 image flow
generates one image with N Euler steps, for each N of ``--steps``; each set is written as a
dataset by ``synth sample``'s writer and read back as ``medflow train`` reads it, so every
image is measured as the segmenter sees it. Two measurements:

1. **Distances to the source's own test slabs** (real images of the same site that stage 1
   never saw), per feature group of the harness's evaluation encoder (seed 1: not the
   reward's), over the tissue (the foreground above the normalised zero background),
   standardised by the test slices' spread (each group weighted equally), as the harness's
   distances are: MMD² and the Fréchet distance. Rows: the real training slices (the floor:
   other anatomy, same site and scanner), the generated sets (the *same* anatomy as those
   real slices: only the images differ), and the target site's test slabs (the size of the
   site gap, for scale; they are the reference slabs' own anatomy through the site's shift,
   so they sit closer than other anatomy would wherever a group sees anatomy). Also the
   mean log band energy of each Laplacian level (finest first): a generator that smooths
   has less fine-band energy than real images.
2. **Train on synthetic, test on real**: one segmenter on only the generated pairs of each N,
   and one on the real training slices, for every seed of ``--seeds``, all with the same
   config (the harness's segmenter: MedFlowSeg at 64 x 64, 200 steps), scored on the source's
   test slabs. The gap between the two says how much a segmenter loses by learning from the
   generator's images instead of real ones, with the anatomy held fixed.

Writes ``image_fidelity.json`` and ``image_fidelity.md`` into ``--results``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

GROUPS = ("moments", "histogram", "style", "laplacian", "lowfreq")


def generated_sets(model_path: Path, source: Path, out: Path, steps: list[int], seed: int):
    """``{N: dataset}``: the stage-1 images for every real training mask of ``source`` at N
    Euler steps, one dataset each (synthetic cases only)."""
    from medflow.synthesis.model import SynthModel
    from medflow.synthesis.sample import sample_dataset, source_slices

    masks = source_slices(source, SynthModel.load(model_path)).masks
    sets = {}
    for n in steps:
        path = out / "datasets" / f"stage1_{n}steps"
        if not (path / "dataset.json").exists():
            sample_dataset(
                model_path,
                path,
                len(masks),
                seed=seed,
                steps=n,
                masks=masks,
                force=True,
                quiet=True,
                device="cpu",
            )
        sets[n] = path
    return sets


def read_images(dataset: Path, prep, num_classes: int, test: bool = False) -> torch.Tensor:
    """The images of ``dataset``'s training (or test) cases, as ``medflow train`` reads them."""
    from medflow.data.datasets import load_slices
    from medflow.data.layout import load_dataset

    spec = load_dataset(dataset)
    return load_slices(spec.test if test else spec.training, prep, num_classes).images


def group_distances(sets: dict[str, torch.Tensor], ref: torch.Tensor, level: float | None):
    """Per feature group (and all of :data:`GROUPS` together), MMD² and Fréchet distance of
    every set to ``ref``, over the tissue; and each set's mean Laplacian band energies."""
    from medflow.metrics.distribution import frechet_distance, mmd2
    from medflow.synthesis.harness import EVAL_ENCODER_SEED
    from medflow.synthesis.reward import FeatureEncoder, feature_scale
    from medflow.synthesis.view import foreground

    channels = ref.shape[1]
    out: dict = {}
    selections = {**{g: (g,) for g in GROUPS}, "all five": GROUPS}
    with torch.no_grad():
        for label, groups in selections.items():
            encoder = FeatureEncoder(channels, seed=EVAL_ENCODER_SEED, features=groups)
            ref_f = encoder(ref, foreground(ref, level))
            scale = feature_scale(ref_f, encoder.groups)
            for name, images in sets.items():
                f = encoder(images, foreground(images, level))
                out.setdefault(name, {})[label] = {
                    "mmd2": float(mmd2(f / scale, ref_f / scale)),
                    "frechet": frechet_distance(f / scale, ref_f / scale),
                }
        bands = FeatureEncoder(channels, seed=EVAL_ENCODER_SEED, features=("laplacian",))
        for name, images in {**sets, "source test (reference)": ref}.items():
            energy = bands(images, foreground(images, level)).mean(0)
            out.setdefault(name, {})["laplacian_log_energy"] = [float(e) for e in energy]
    return out


def train_on(arms: dict[str, Path], source: Path, out: Path, seeds, segmenter: dict):
    """Rows of :func:`~medflow.segmentation.protocol.run_protocol`: a segmenter per arm and
    seed, trained on its dataset and scored on ``source``'s test slabs."""
    from medflow.segmentation.protocol import Arm, run_protocol

    protocol = [
        Arm(name, data, segmenter, test=source, tags={"condition": name})
        for name, data in arms.items()
    ]
    return run_protocol(protocol, seeds, out / "segmenters", reuse=True, say=print)


def summary(rows: list[dict]) -> dict:
    """Per arm: mean foreground Dice (%) over seeds, its standard deviation and values, and
    the mean paired difference to the real arm."""
    by: dict = {}
    for r in rows:
        by.setdefault(r["condition"], {})[r["seed"]] = 100 * r["foreground"]["dice"]
    real = by["real"]
    out = {}
    for name, values in by.items():
        v = list(values.values())
        out[name] = {
            "dice": statistics.fmean(v),
            "dice_std": statistics.stdev(v) if len(v) > 1 else 0.0,
            "dice_values": v,
            "minus_real": statistics.fmean(values[s] - real[s] for s in values),
        }
    return out


def markdown(record: dict) -> str:
    dist = record["distances_to_source_test"]
    labels = [*GROUPS, "all five"]
    lines = [
        "MMD² to the source's test slabs, per feature group (tissue only; Fréchet for all five)",
        "",
        "| images | " + " | ".join(labels) + " | Fréchet (all five) |",
        "|---|" + "---|" * (len(labels) + 1),
    ]
    for name, d in dist.items():
        if name == "source test (reference)":
            continue
        cells = [f"{d[g]['mmd2']:.3f}" for g in labels]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {d['all five']['frechet']:.1f} |")
    lines += ["", "| images | log band energy, levels 1-4 (finest first) |", "|---|---|"]
    for name, d in dist.items():
        energies = ", ".join(f"{e:.2f}" for e in d["laplacian_log_energy"])
        lines.append(f"| {name} | {energies} |")
    lines += [
        "",
        "Train on each set alone, test on the source's real test slabs (foreground Dice, %)",
        "",
        "| training set | Dice | per seed | − real (paired) |",
        "|---|---|---|---|",
    ]
    for name, s in record["train_synthetic_test_real"].items():
        per = ", ".join(f"{v:.1f}" for v in s["dice_values"])
        lines.append(
            f"| {name} | {s['dice']:.1f} ± {s['dice_std']:.1f} | {per} | {s['minus_real']:+.1f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--synth-model", type=Path, required=True, help="stage-1 synth.pt")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--source", type=Path, help="labelled source (default: mni152-tissue)")
    ap.add_argument("--target", type=Path, help="target site (default: mni152-tissue-shifted)")
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 20, 50])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--segmenter-steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    return ap.parse_args()


def main() -> None:
    from medflow.data.builtin import built
    from medflow.data.layout import load_dataset
    from medflow.synthesis.model import SynthModel

    args = parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    source = args.source or built("mni152-tissue", args.out / "data" / "mni152-tissue")
    target = args.target or built("mni152-tissue-shifted", args.out / "data" / "mni152-shifted")
    model = SynthModel.load(args.synth_model)
    k = load_dataset(source).num_classes
    sets = generated_sets(args.synth_model, source, args.out, args.steps, args.seeds[0])
    images = {"real training slices": read_images(source, model.prep, k)}
    images |= {f"stage 1, {n} steps": read_images(p, model.prep, k) for n, p in sets.items()}
    images["target site test slabs"] = read_images(target, model.prep, k, test=True)
    reference = read_images(source, model.prep, k, test=True)
    distances = group_distances(images, reference, model.background_level)
    segmenter = {
        "size": model.size[0],
        "steps": args.segmenter_steps,
        "val_fraction": 0,
        "threads": args.threads,
    }
    arms = {"real": source, **{f"stage 1, {n} steps": p for n, p in sets.items()}}
    rows = train_on(arms, source, args.out, args.seeds, segmenter)
    record = {
        "synth_model": str(args.synth_model),
        "steps": args.steps,
        "seeds": args.seeds,
        "segmenter": segmenter,
        "seconds": time.perf_counter() - t0,
        "distances_to_source_test": distances,
        "train_synthetic_test_real": summary(rows),
        "rows": rows,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "image_fidelity.json").write_text(json.dumps(record, indent=2))
    (args.results / "image_fidelity.md").write_text(markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    main()
