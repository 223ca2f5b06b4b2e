"""AlignFlow's downstream harness in one command (see medflow.synthesis.harness).

By default it builds the embedded source (``mni152-tissue``) and the simulated target site
(``mni152-tissue-shifted``) into ``<out>/data`` and runs the whole protocol:

    python benchmarks/alignflow.py --out runs/alignflow \\
        --results benchmarks/results/alignflow.json

``--site site-c`` builds and measures on the second simulated site instead
(``mni152-tissue-site-c``: another kind of shift, outside the augmentation baseline's family;
docs/DATA.md).

``--set section.field=value`` changes a field of the segmenter (``segmenter.steps=300``),
stage 1 (``synth.steps=1200``) or stage 2 (``align.reg_weight=1``); ``--synth-model`` reuses
a stage-1 checkpoint instead of training one (or one per seed, in ``--seeds`` order);
``--stage1-per-seed`` trains one stage 1 per replicate seed, so the intervals also hold
what stage 1's seed changes; ``--draw-references`` has every replicate draw its K references
at random with its seed instead of taking the first K. ``--baselines`` picks the control, baseline
and translation arms (default: the four controls and baselines; ``--baselines`` alone: none;
``translated`` and ``translated_sdedit``, translation from real masks, and ``unjudged``, the
alignment without ``--judge``, only when named: each adds an alignment and a segmenter per K
and seed); each trains one segmenter per seed, the
histogram-matching baseline and the translation arms one per K. ``--synthetic-fraction F``
draws that share of every batch of an arm with synthetic pairs from them.
"""

from __future__ import annotations

import argparse
import ast
import shutil
import time
from pathlib import Path

# embedded target per simulated site: (dataset, folder under <out>/data); site-b keeps the
# folder it always had, so --reuse finds earlier runs' target
TARGETS = {
    "site-b": ("mni152-tissue-shifted", "mni152-shifted"),
    "site-c": ("mni152-tissue-site-c", "mni152-tissue-site-c"),
}


def parse_set(items: list[str]) -> dict[str, dict]:
    sections: dict[str, dict] = {"segmenter": {}, "synth": {}, "align": {}}
    for item in items:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        if section not in sections or not name or not value:
            raise SystemExit(f"--set {item!r}: expected segmenter|synth|align.FIELD=VALUE")
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        sections[section][name] = parsed
    return sections


def main() -> None:
    from medflow.data.builtin import build
    from medflow.synthesis.harness import (
        BASELINES,
        DEFAULT_BASELINES,
        HarnessConfig,
        run_alignflow,
    )

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--source", type=Path, help="labelled source dataset (default: embedded)")
    ap.add_argument("--target", type=Path, help="target dataset (default: embedded, simulated)")
    ap.add_argument(
        "--site",
        choices=sorted(TARGETS),
        help="simulated site of the embedded target, when --target is not given (default "
        "site-b: mni152-tissue-shifted; site-c: mni152-tissue-site-c)",
    )
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n-synthetic", type=int, default=96)
    ap.add_argument("--no-oracle", action="store_true")
    ap.add_argument(
        "--baselines",
        nargs="*",
        choices=BASELINES,
        default=list(DEFAULT_BASELINES),
        help="control, baseline and translation arms to run (default: "
        f"{' '.join(DEFAULT_BASELINES)}; translated, translated_sdedit, "
        "augmented_aligned and unjudged only when named)",
    )
    ap.add_argument(
        "--sdedit-start", type=float, default=0.5, help="t0 of the translated_sdedit arm"
    )
    ap.add_argument(
        "--synthetic-fraction",
        type=float,
        default=0.0,
        help="share of every batch drawn from the synthetic pairs (0: by their count)",
    )
    ap.add_argument("--augment-copies", type=int, default=1, help="augmented copies per case")
    ap.add_argument(
        "--judge",
        choices=["source", "augmented"],
        help="the arm whose segmenter the alignments use: for the class anchors "
        "(--set align.class_anchor_weight=W) and/or the judge term (align.judge_weight=W)",
    )
    ap.add_argument(
        "--synth-model",
        type=Path,
        nargs="+",
        help="reuse this stage-1 synth.pt (or one per seed, in --seeds order)",
    )
    ap.add_argument(
        "--stage1-per-seed",
        action="store_true",
        help="train stage 1 once per replicate seed (its SynthConfig.seed)",
    )
    ap.add_argument(
        "--draw-references",
        action="store_true",
        help="every replicate draws its K references at random with its seed (nested over K)",
    )
    ap.add_argument("--set", nargs="*", default=[], help="section.field=value overrides")
    ap.add_argument("--results", type=Path, help="copy results.json here")
    ap.add_argument("--force", action="store_true")
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="read back alignments, datasets and segmenter runs already complete in --out",
    )
    args = ap.parse_args()
    if args.site is not None and args.target is not None:
        ap.error("--site chooses the embedded target: give --site or --target, not both")
    if args.synth_model and len(args.synth_model) not in (1, len(args.seeds)):
        ap.error(f"--synth-model: give one checkpoint, or one per seed ({len(args.seeds)})")
    if args.synth_model and args.stage1_per_seed:
        ap.error("--stage1-per-seed trains stage 1: give it or --synth-model, not both")

    source, target = args.source, args.target
    if source is None:
        source = args.out / "data" / "mni152"
        if not (source / "dataset.json").exists():
            build("mni152-tissue", source)
    if target is None:
        name, folder = TARGETS[args.site or "site-b"]
        target = args.out / "data" / folder
        if not (target / "dataset.json").exists():
            build(name, target)
    sections = parse_set(args.set)
    defaults = HarnessConfig()
    cfg = HarnessConfig(
        ks=tuple(args.ks),
        seeds=tuple(args.seeds),
        n_synthetic=args.n_synthetic,
        oracle=not args.no_oracle,
        baselines=tuple(args.baselines),
        augment_copies=args.augment_copies,
        sdedit_start=args.sdedit_start,
        synthetic_fraction=args.synthetic_fraction,
        judge=args.judge,
        segmenter={**defaults.segmenter, **sections["segmenter"]},
        synth=sections["synth"],
        align=sections["align"],
        stage1_per_seed=args.stage1_per_seed,
        draw_references=args.draw_references,
    )
    t0 = time.perf_counter()
    run_alignflow(
        source,
        target,
        args.out,
        cfg,
        synth_model=args.synth_model,
        force=args.force,
        reuse=args.reuse,
    )
    print((args.out / "results.md").read_text())
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(args.out / "results.json", args.results)
        shutil.copy(args.out / "results.md", args.results.with_suffix(".md"))


if __name__ == "__main__":
    main()
