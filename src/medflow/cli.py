"""The ``medflow`` command: one verb per pipeline stage.

    medflow datasets list | build NAME --out DIR | verify DIR
    medflow plan     DATA [--out plans.json] [--memory-gib G] [--set FIELD=VALUE ...]
    medflow train    --data DIR --out RUN_DIR [hyperparameters]
    medflow predict  --model CHECKPOINT --input FILE_OR_DIR --out DIR [--uncertainty]
    medflow evaluate --pred DIR --ref DIR --out DIR [--raters DATASET [--samples S ...]]
    medflow export   --model CHECKPOINT --out MODEL.onnx
    medflow report   --pred DIR --eval DIR --out REPORT.html [--run RUN_DIR] [--png DIR]
    medflow synth    train --data DIR --out RUN | align --model synth.pt --references DIR
                     --out RUN | sample --model synth.pt --out DATASET --n N

A problem with the user's input ends the command with one line on stderr naming the file or
value, and exit code 2; nothing is half-written. docs/ERRORS.md lists the problems and their
messages.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from medflow import __version__
from medflow.errors import MedflowError, one_line

EXIT_USER_ERROR = 2
# OSErrors that are the machine's state, not our bug: reported in one line like a bad input
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.EFBIG,
}


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(
            EXIT_USER_ERROR,
            f"{self.prog}: error: {one_line(message)}; see {self.prog} --help\n",
        )


def _field_help(cls: type) -> dict[str, str]:
    """The ``Attributes:`` entries of a dataclass docstring, for ``--help``."""
    doc = cls.__doc__ or ""
    helps, current = {}, None
    for line in doc.split("Attributes:", 1)[-1].splitlines():
        m = re.match(r"\s{8}(\w+): (.*)", line)
        if m:
            current = m.group(1)
            helps[current] = m.group(2).strip().replace("``", "")
        elif current and line.strip():
            helps[current] += " " + line.strip().replace("``", "")
    return helps


def _add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--flag`` per dataclass field, typed from its default."""
    helps = _field_help(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        text = f"{helps.get(f.name, '')} (default: {default})"
        if isinstance(default, bool):
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text
            )
        elif isinstance(default, tuple) and default and all(isinstance(v, str) for v in default):
            # names (AlignConfig.reward_features): space-separated, checked by the config
            parser.add_argument(
                flag,
                dest=f.name,
                nargs="+",
                default=None,
                metavar="NAME",
                help=f"{helps.get(f.name, '')} (default: {' '.join(default)})",
            )
        elif isinstance(default, tuple):
            parser.add_argument(
                flag,
                dest=f.name,
                default=None,
                metavar="C1,C2,...",
                type=lambda s: tuple(int(v) for v in s.split(",")),
                help=text,
            )
        elif default is None:  # optional: typed from the annotation ("float | None", ...)
            kind = next((t for t in (float, str) if t.__name__ in str(f.type)), int)
            parser.add_argument(flag, dest=f.name, type=kind, default=None, help=text)
        elif isinstance(default, int):
            parser.add_argument(flag, dest=f.name, type=int, default=None, help=text)
        elif isinstance(default, float):
            parser.add_argument(flag, dest=f.name, type=float, default=None, help=text)
        else:
            parser.add_argument(flag, dest=f.name, type=str, default=None, help=text)


def _config_from_args(cls: type, args: argparse.Namespace):
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if getattr(args, f.name) is not None
    }
    try:
        return cls(**given)
    except ValueError as exc:
        problem = str(exc).split(" (got ")[0]
        if ", got " not in problem:
            named = [
                f"--{name.replace('_', '-')} {_flag_value(value)}"
                for name, value in given.items()
                if re.search(rf"\b{name}\b", problem)
            ]
            problem += f" (got {', '.join(named)})" if named else ""
        raise MedflowError(f"bad training option: {problem}") from exc


def _flag_value(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, list):  # a nargs="+" flag's words
        return " ".join(map(str, value))
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    """The ``medflow`` parser: one small builder per verb."""
    parser = _Parser(prog="medflow", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"medflow {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    _add_datasets(verbs)
    _add_plan(verbs)
    _add_train(verbs)
    _add_predict(verbs)
    _add_evaluate(verbs)
    _add_bench(verbs)
    _add_export(verbs)
    _add_report(verbs)
    _add_synth(verbs)
    return parser


def _add_datasets(verbs) -> None:
    """`medflow datasets`."""
    ds = verbs.add_parser("datasets", help="list, build and verify datasets")
    ds_verbs = ds.add_subparsers(dest="action", required=True, metavar="ACTION")
    ds_verbs.add_parser("list", help="list the embedded datasets")
    b = ds_verbs.add_parser("build", help="build an embedded dataset as an nnU-Net raw folder")
    b.add_argument(
        "name",
        help="mni152-tissue, mni152-tissue-shifted, mni152-tissue-site-c, mni152-raters, "
        "mni152-lesions or dsb-nuclei",
    )
    b.add_argument("--out", required=True, type=Path, help="dataset folder to create")
    b.add_argument("--force", action="store_true", help="replace an existing folder")
    b.add_argument(
        "--raters",
        type=int,
        metavar="R",
        help="mni152-raters: simulated annotations per case, at least 2 (default 8)",
    )
    b.add_argument(
        "--correlation-mm",
        type=float,
        metavar="L",
        help="mni152-raters: correlation length of a rater's noise in mm, 0 for independent "
        "voxels (default 4)",
    )
    v = ds_verbs.add_parser("verify", help="open every file of a dataset and report problems")
    v.add_argument("root", type=Path, help="dataset folder (nnU-Net raw v2 or MSD)")


def _add_plan(verbs) -> None:
    """`medflow plan`."""
    p = verbs.add_parser(
        "plan", help="fingerprint a dataset and plan how to train on it (docs/PLANNING.md)"
    )
    p.add_argument("data", type=Path, help="dataset folder (nnU-Net raw v2 or MSD)")
    p.add_argument("--out", type=Path, help="plans.json to write (default: only print the plan)")
    p.add_argument(
        "--memory-gib",
        type=float,
        default=8.0,
        metavar="G",
        help="training memory budget in GiB that patch and batch size are fitted to (default 8)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a plan field, e.g. --set patch_size=256,256 --set levels=5 (repeatable)",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")


def _add_train(verbs) -> None:
    """`medflow train`."""
    from medflow.segmentation.config import TrainConfig

    t = verbs.add_parser("train", help="train a segmenter on a dataset folder")
    t.add_argument("--data", required=True, type=Path, help="dataset folder")
    t.add_argument("--out", required=True, type=Path, help="run folder")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    t.add_argument("--resume", action="store_true", help="continue from checkpoint_last.pt")
    t.add_argument("--force", action="store_true", help="overwrite an existing run folder")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument(
        "--processes",
        type=int,
        default=1,
        help="data-parallel processes on this machine, started under torchrun "
        "(default 1; see docs/DISTRIBUTED.md)",
    )
    _add_config_flags(t.add_argument_group("hyperparameters"), TrainConfig)


def _add_predict(verbs) -> None:
    """`medflow predict`."""
    p = verbs.add_parser("predict", help="predict label maps for a file or a folder")
    p.add_argument(
        "--model",
        required=True,
        type=Path,
        nargs="+",
        help="checkpoint (.pt); several predict as an ensemble, their soft masks averaged "
        "on the input's grid (masks only)",
    )
    p.add_argument("--input", required=True, type=Path, help="image file or folder")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="network steps (default: 1 for a flow model, one evaluation; 50 for ddim, "
        "1000 for ddpm)",
    )
    p.add_argument(
        "--sampler",
        default="auto",
        choices=("auto", "euler", "heun", "refine", "shortcut", "ddim", "ddpm"),
        help="euler or heun for a flow model (from noise, one step lands on the posterior "
        "mean); refine (a flow model: the one-step estimate, then Euler from --refine-start "
        "to 1 in the remaining steps); shortcut (models trained with shortcut jumps) for "
        "posterior samples, one evaluation each; ddim or ddpm for a diffusion model "
        "(default auto: euler or ddim by the checkpoint; with --uncertainty, a shortcut "
        "model's samples are shortcut jumps and its mask the one-step posterior mean)",
    )
    p.add_argument(
        "--refine-start",
        type=float,
        default=0.5,
        metavar="T0",
        help="with --sampler refine: the time in (0, 1] the refinement restarts from (default 0.5)",
    )
    p.add_argument(
        "--samples",
        type=int,
        default=1,
        help="noise draws: averaged into the mask (an ensemble), except for a model with "
        "shortcut jumps and --sampler auto, whose mask is the one-evaluation posterior mean "
        "and whose samples are the posterior samples of --uncertainty / --save-samples",
    )
    p.add_argument(
        "--fusion",
        default="mean",
        choices=("mean", "vote"),
        help="fuse --samples by their mean soft mask or by majority vote of their label maps",
    )
    p.add_argument(
        "--uncertainty",
        action="store_true",
        help="also write <case>_variance and <case>_entropy maps beside each mask, and "
        "prediction.json (docs/UNCERTAINTY.md)",
    )
    p.add_argument(
        "--save-samples",
        action="store_true",
        help="with the maps, also write every sample's label map (<case>_sample00, ...) and "
        "the soft mask (<case>_probabilities), for evaluate --raters",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--batch-size", type=int, default=32, help="slices per network call")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the network in channels-last memory format (default: on; faster batched "
        "inference on CPU, docs/PERFORMANCE.md)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="run the network through torch.compile: every new batch shape compiles first, "
        "tens of seconds on a CPU (docs/PERFORMANCE.md)",
    )
    p.add_argument(
        "--postprocess",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep only the largest component of the classes where the model's validation "
        "chose it (default: on; a model trained without validation has none)",
    )
    p.add_argument("--force", action="store_true", help="overwrite existing predictions")
    p.add_argument("--quiet", action="store_true")


def _add_evaluate(verbs) -> None:
    """`medflow evaluate`."""
    e = verbs.add_parser("evaluate", help="Dice, IoU, HD95, ASSD of predictions")
    e.add_argument("--pred", required=True, type=Path, help="folder of predictions")
    e.add_argument("--ref", required=True, type=Path, help="folder of reference label maps")
    e.add_argument("--out", required=True, type=Path, help="folder for per_case.csv, summary.json")
    e.add_argument(
        "--lesions",
        action="store_true",
        help="also score each class object by object: lesion-wise detection (connected "
        "components; found, missed, false; precision, recall, F1), per case and pooled",
    )
    e.add_argument("--force", action="store_true", help="overwrite an existing summary")
    e.add_argument(
        "--raters",
        type=Path,
        metavar="DATASET",
        help="dataset folder holding labelsTs/, ratersTs/ (several raters per case) and "
        "optionally probabilitiesTs/: also score the posterior samples of predict "
        "--save-samples (GED, matched IoU, calibration) into ambiguity.json",
    )
    e.add_argument(
        "--samples",
        type=int,
        nargs="+",
        metavar="S",
        help="with --raters: the sample counts to score, on the first S samples (default 1 4 16)",
    )


def _add_bench(verbs) -> None:
    """`medflow bench`."""
    from medflow.segmentation.bench import METHODS as BENCH_METHODS

    bn = verbs.add_parser(
        "bench", help="UNet, MedFlowSeg and diffusion side by side: Dice against cost"
    )
    bn.add_argument("--out", required=True, type=Path, help="folder for results and runs")
    bn.add_argument(
        "--mode",
        choices=("quick", "full"),
        default="quick",
        help="quick: 64 x 64, 60 steps, one seed, cheap samplers, no ablations (minutes on "
        "a CPU); full: 64 x 64, 150 steps, 3 seeds, every sampler and the ablations (43 "
        "min on a quiet 2-core CPU; settings of over 100 network calls per image, DDPM-1000, on "
        "the first seed only)",
    )
    bn.add_argument(
        "--data",
        nargs="+",
        default=None,
        help="embedded dataset names or nnU-Net raw folders (default: mni152-tissue dsb-nuclei)",
    )
    bn.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=tuple(BENCH_METHODS),
        metavar="METHOD",
        help=f"methods to compare, of {', '.join(BENCH_METHODS)} (default: quick mode unet "
        "medflowseg diffusion; full mode all, the ablations without DBSA, FAA or both "
        "included)",
    )
    bn.add_argument(
        "--budget",
        nargs="+",
        default=None,
        choices=("steps", "time", "plateau"),
        help="steps: the same steps for every method; time: the same training time; "
        "plateau: each method until its validation Dice stalls (--plateau-patience "
        "validations without a rise) with its learning rate already halved "
        "--plateau-reductions times (at most --plateau-cap steps)",
    )
    bn.add_argument("--plateau-cap", type=int, default=None, help="plateau budget: most steps")
    bn.add_argument(
        "--plateau-patience", type=int, default=None, help="plateau budget: validations"
    )
    bn.add_argument(
        "--plateau-reductions",
        type=int,
        default=None,
        help="plateau budget: stalls that halve the learning rate before one ends the run "
        "(default 3; 0: the first stall ends it, at the constant peak rate)",
    )
    bn.add_argument("--steps", type=int, default=None, help="training steps (steps budget)")
    bn.add_argument("--seeds", type=int, nargs="+", default=None)
    bn.add_argument(
        "--skip-settings",
        nargs="+",
        default=(),
        metavar="LABEL",
        help="sampling settings to leave out, by their label in the table (e.g. ddpm-1000)",
    )
    bn.add_argument("--device", default="auto")
    bn.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    bn.add_argument("--force", action="store_true", help="overwrite an earlier results.json")
    bn.add_argument(
        "--reuse",
        action="store_true",
        help="read back runs already finished in --out with the same settings (resume)",
    )
    bn.add_argument("--quiet", action="store_true")


def _add_export(verbs) -> None:
    """`medflow export`."""
    x = verbs.add_parser("export", help="ONNX file of a checkpoint's one-call predictor")
    x.add_argument("--model", required=True, type=Path, help="checkpoint (.pt)")
    x.add_argument("--out", required=True, type=Path, help="ONNX file to write")
    x.add_argument("--force", action="store_true", help="overwrite an existing file")


def _add_report(verbs) -> None:
    """`medflow report`."""
    r = verbs.add_parser("report", help="one self-contained HTML page (or PNG overlays)")
    r.add_argument("--pred", required=True, type=Path, help="folder of predictions (and maps)")
    r.add_argument("--eval", required=True, type=Path, help="folder holding summary.json")
    r.add_argument("--out", type=Path, help="HTML file to write")
    r.add_argument("--png", type=Path, help="folder for one overlay PNG per case")
    r.add_argument("--images", type=Path, help="image folder (default: beside the references)")
    r.add_argument("--run", type=Path, help="run folder: training curves and config")
    r.add_argument("--force", action="store_true", help="overwrite an existing report")


def _add_synth(verbs) -> None:
    from medflow.synthesis.config import AlignConfig, SynthConfig

    sy = verbs.add_parser("synth", help="AlignFlow: generate image-mask pairs for a new site")
    sy_verbs = sy.add_subparsers(dest="action", required=True, metavar="ACTION")
    st = sy_verbs.add_parser("train", help="stage 1: mask flow + image flow on labelled data")
    st.add_argument("--data", required=True, type=Path, help="labelled source dataset folder")
    st.add_argument("--out", required=True, type=Path, help="run folder (synth.pt)")
    _add_synth_common(st)
    _add_config_flags(st.add_argument_group("hyperparameters"), SynthConfig)
    sa = sy_verbs.add_parser(
        "align", help="stage 2: fine-tune the image flow towards unlabelled target images"
    )
    sa.add_argument("--model", required=True, type=Path, help="stage-1 synth.pt")
    sa.add_argument(
        "--references", required=True, type=Path, help="folder of unlabelled target-site images"
    )
    sa.add_argument("--out", required=True, type=Path, help="run folder (aligned synth.pt)")
    sa.add_argument(
        "--real-masks",
        dest="masks",
        action="store_const",
        const="real",
        default=None,
        help="align for the real training masks of --source, not mask-flow samples "
        "(same as --masks real; --start-time T0 translates their images from T0)",
    )
    sa.add_argument(
        "--source",
        type=Path,
        default=None,
        metavar="DATA",
        help="the labelled source dataset of --real-masks (synth.pt does not record it)",
    )
    _add_synth_common(sa)
    _add_config_flags(sa.add_argument_group("hyperparameters"), AlignConfig)
    ss = sy_verbs.add_parser("sample", help="write N synthetic pairs as an nnU-Net raw dataset")
    ss.add_argument("--model", required=True, type=Path, help="synth.pt (aligned or not)")
    ss.add_argument("--out", required=True, type=Path, help="dataset folder to create")
    ss.add_argument("--n", required=True, type=int, help="number of image-mask pairs")
    ss.add_argument("--seed", type=int, default=0, help="seed of masks and noise")
    ss.add_argument(
        "--steps",
        type=int,
        default=None,
        help="Euler steps of the image flow (default: the model's); masks use stage 1's",
    )
    ss.add_argument("--batch-size", type=int, default=16, help="pairs per network call")
    ss.add_argument(
        "--per-case",
        type=int,
        default=8,
        help="for a source of volumes, slices stacked into each synthetic case (default 8)",
    )
    ss.add_argument(
        "--include-source",
        type=Path,
        default=None,
        help="also copy this dataset's labelled training cases in (real + synthetic)",
    )
    ss.add_argument(
        "--real-masks",
        type=Path,
        default=None,
        metavar="DATA",
        help="generate for real training masks of DATA (drawn with --seed, each once before "
        "any twice) and, for a model aligned with --start-time, from their images",
    )
    _add_synth_common(ss)


def _add_synth_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--force", action="store_true", help="overwrite existing outputs")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _datasets(args: argparse.Namespace) -> int:
    from medflow.data import builtin

    if args.action == "list":
        for name, ds in builtin.BUILTINS.items():
            print(f"{name:22s} {ds.description}")
        return 0
    if args.action == "build":
        given = {"raters": args.raters, "correlation_mm": args.correlation_mm}
        options = {k: v for k, v in given.items() if v is not None}
        if options and args.name != "mni152-raters":
            flags = " and ".join(f"--{k.replace('_', '-')}" for k in options)
            raise MedflowError(f"{flags}: only for mni152-raters, not for {args.name!r}")
        try:
            meta = builtin.build(args.name, args.out, force=args.force, **options)
        except OSError as exc:
            if exc.errno not in ENVIRONMENT_ERRNOS:
                raise
            # the build ran in a temporary sibling folder, already removed: name the target
            raise MedflowError(f"{args.out}: cannot be written: {exc.strerror}") from exc
        split = meta["medflow"]["split"]
        raters = meta["medflow"].get("raters")
        print(
            f"built {args.name} in {args.out}: {len(split['train'])} training and "
            f"{len(split['test'])} test cases"
            + (f", {raters} simulated raters each" if raters else "")
        )
        return 0
    from medflow.data.layout import verify_dataset

    problems = verify_dataset(args.root)
    # stderr holds the problems, one line each (``2> problems.txt``); the count goes to stdout
    for line in problems:
        print(one_line(line), file=sys.stderr)
    if problems:
        print(f"{args.root}: {len(problems)} problem(s) found")
        return EXIT_USER_ERROR
    print(f"{args.root}: OK")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from medflow.data.fingerprint import fingerprint_dataset
    from medflow.data.layout import load_dataset
    from medflow.data.plan import format_plan, parse_overrides, plan_from_fingerprint, write_plan
    from medflow.engine.runtime import resolve_device
    from medflow.errors import OutputExistsError
    from medflow.segmentation.planning import compute_kind

    overrides = {}
    for item in args.overrides:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise MedflowError(f"--set {item!r}: expected FIELD=VALUE, e.g. patch_size=256,256")
        overrides[name.strip()] = value
    # every option is checked before any image is read
    for flag, given in (("--set", overrides), ("--memory-gib", {"memory_gib": args.memory_gib})):
        try:
            parse_overrides(given)
        except ValueError as exc:
            raise MedflowError(f"bad plan option: {flag}: {exc}") from exc
    if args.out is not None:
        if args.out.is_dir():
            raise MedflowError(f"{args.out}: is a folder; expected a file path like plans.json")
        if args.out.exists() and not args.force:
            raise OutputExistsError(args.out)
    compute = compute_kind(resolve_device("auto"))  # this machine; --set compute=gpu for another
    fingerprint = fingerprint_dataset(load_dataset(args.data))
    try:
        plan = plan_from_fingerprint(
            fingerprint, memory_gib=args.memory_gib, overrides=overrides, compute=compute
        )
    except ValueError as exc:
        raise MedflowError(f"bad plan option: {exc}") from exc
    print(format_plan(plan))
    if args.out is not None:
        write_plan(args.out, plan)
        print(f"wrote {args.out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from medflow.segmentation.config import TrainConfig
    from medflow.segmentation.train import train

    cfg = _config_from_args(TrainConfig, args)
    if args.out.exists() and not args.out.is_dir():
        raise MedflowError(f"{args.out}: is a file; expected a run folder")
    if args.processes < 1:
        raise MedflowError(f"--processes must be >= 1, got {args.processes}")
    if args.processes > 1 and not _under_torchrun():
        return _relaunch_under_torchrun(args.processes, args.argv)
    result = train(
        args.data,
        args.out,
        cfg,
        device=args.device,
        resume=args.resume,
        force=args.force,
        quiet=args.quiet,
    )
    if not _main_rank():
        return 0  # under torchrun every rank returns; rank 0 reports
    best = "n/a" if result.best_val_dice is None else f"{result.best_val_dice:.4f}"
    print(
        f"trained {result.steps} steps in {result.seconds:.0f} s; best validation Dice "
        f"{best} at step {result.best_step}\nmodel: {result.final_checkpoint} "
        f"(best on validation: {result.best_checkpoint})"
    )
    return 0


def _relaunch_under_torchrun(processes: int, argv: Sequence[str]) -> int:
    """Run this same ``medflow train`` as ``processes`` ranks; each rank's threads default to
    its share of the cores (runtime.configure_threads).

    The ranks' stderr is read back rather than shown, because when a rank stops on a user
    error torchrun adds a multi-line failure report; the rank's own one-line error is what
    this command prints then, with exit code 2.
    """
    import subprocess

    from medflow.engine.distributed import torchrun_command

    rest, skip = [], False
    for arg in argv:  # drop --processes N / --processes=N, so the ranks do not relaunch
        if skip:
            skip = False
        elif arg == "--processes":
            skip = True
        elif not arg.startswith("--processes="):
            rest.append(arg)
    done = subprocess.run(
        torchrun_command(processes, rest), check=False, stderr=subprocess.PIPE, text=True
    )
    if done.returncode == 0:
        return 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("medflow train: ")]
    if errors:
        print(errors[0], file=sys.stderr)
        return EXIT_USER_ERROR if "error:" in errors[0] else done.returncode
    sys.stderr.write(done.stderr)
    return done.returncode


def _under_torchrun() -> bool:
    from medflow.engine.distributed import Ranks

    return Ranks.from_env().active


def _main_rank() -> bool:
    from medflow.engine.distributed import Ranks

    return Ranks.from_env().main


def _predict(args: argparse.Namespace) -> int:
    from medflow.engine.runtime import configure_threads
    from medflow.segmentation.predict import SamplingOptions, predict_folder

    for flag in ("steps", "samples", "batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            name = "--" + flag.replace("_", "-")
            raise MedflowError(f"{name} {getattr(args, flag)}: must be at least 1")
    if args.save_samples and args.samples > 100:
        raise MedflowError(
            f"--samples {args.samples}: --save-samples writes at most 100 samples per case "
            "(<case>_sample00 .. _sample99)"
        )
    if not 0.0 < args.refine_start <= 1.0:
        raise MedflowError(f"--refine-start {args.refine_start}: must be in (0, 1]")
    configure_threads(args.threads)
    options = SamplingOptions(
        steps=args.steps,
        sampler=args.sampler,
        samples=args.samples,
        seed=args.seed,
        batch_size=args.batch_size,
        fusion=args.fusion,
        refine_start=args.refine_start,
    )
    written = predict_folder(
        args.model,
        args.input,
        args.out,
        options=options,
        device=args.device,
        force=args.force,
        quiet=args.quiet,
        uncertainty=args.uncertainty,
        channels_last=args.channels_last,
        compile=args.compile,
        save_samples=args.save_samples,
        postprocess=args.postprocess,
    )
    if _main_rank():
        maps = " with variance and entropy maps" if args.uncertainty or args.save_samples else ""
        maps += " and every sample" if args.save_samples else ""
        print(f"wrote {len(written)} prediction(s){maps} to {args.out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from medflow.metrics import ambiguity_summary as amb
    from medflow.metrics.summary import evaluate_folders, format_summary

    if args.raters is None:
        if args.samples is not None:
            raise MedflowError("--samples scores posterior samples; it needs --raters DATASET")
        summary = evaluate_folders(
            args.pred, args.ref, args.out, force=args.force, lesions=args.lesions
        )
    else:
        # everything is read and checked before the first file is written
        amb.check_outputs(args.out, args.force)
        samples = (1, 4, 16) if args.samples is None else args.samples
        results = amb.ambiguity_results(args.pred, args.raters, samples=samples)
        summary = evaluate_folders(
            args.pred, args.ref, args.out, force=args.force, lesions=args.lesions
        )
        amb.write_ambiguity(results, args.out, force=True)  # checked above
    print(format_summary(summary))
    print(f"per-case results: {args.out / 'per_case.csv'}, {args.out / 'summary.json'}")
    if args.raters is not None:
        print(amb.format_ambiguity(results))
        print(
            f"several raters: {args.out / 'ambiguity_per_case.csv'}, {args.out / 'ambiguity.json'}"
        )
    return 0


def _report(args: argparse.Namespace) -> int:
    from medflow.report.html import write_report
    from medflow.report.overlay import write_overlays

    if args.out is None and args.png is None:
        raise MedflowError("nothing to write: pass --out REPORT.html, --png DIR or both")
    if args.out is not None:
        path = write_report(
            args.pred, args.eval, args.out, images=args.images, run=args.run, force=args.force
        )
        print(f"wrote {path}")
    if args.png is not None:
        written = write_overlays(
            args.pred, args.eval, args.png, images=args.images, force=args.force
        )
        print(f"wrote {len(written)} overlay(s) to {args.png}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import dataclasses

    from medflow.engine.runtime import configure_threads
    from medflow.segmentation.bench import BenchConfig, markdown_table, run_bench

    cfg = BenchConfig.quick() if args.mode == "quick" else BenchConfig.full()
    given = {
        "datasets": tuple(args.data) if args.data else None,
        "methods": tuple(args.methods) if args.methods else None,
        "budgets": tuple(args.budget) if args.budget else None,
        "steps": args.steps,
        "seeds": tuple(args.seeds) if args.seeds else None,
        "plateau_cap": args.plateau_cap,
        "plateau_patience": args.plateau_patience,
        "plateau_reductions": args.plateau_reductions,
    }
    if args.steps is not None and args.steps < 1:
        raise MedflowError(f"--steps {args.steps}: must be at least 1")
    cfg = dataclasses.replace(cfg, **{k: v for k, v in given.items() if v is not None})
    if args.skip_settings:
        cfg = cfg.without_settings(args.skip_settings)
    configure_threads(args.threads)
    record = run_bench(
        cfg, args.out, device=args.device, force=args.force, quiet=args.quiet, reuse=args.reuse
    )
    print(markdown_table(record["rows"]), end="")
    print(f"wrote {args.out / 'results.json'}, results.md, dice_vs_cost.png, curves.png")
    return 0


def _export(args: argparse.Namespace) -> int:
    from medflow.segmentation.export import export_onnx

    result = export_onnx(args.model, args.out, force=args.force)
    check = (
        "not checked (onnxruntime not installed)"
        if result.max_abs_diff is None
        else f"onnxruntime matches PyTorch within {result.max_abs_diff:.1e}"
    )
    print(f"wrote {result.path} (inputs: {', '.join(result.inputs)}); {check}")
    return 0


def _synth(args: argparse.Namespace) -> int:
    if args.action == "train":
        from medflow.synthesis.config import SynthConfig
        from medflow.synthesis.train import train_synth

        cfg = _config_from_args(SynthConfig, args)
        path = train_synth(
            args.data, args.out, cfg, device=args.device, force=args.force, quiet=args.quiet
        )
        print(f"wrote {path} (preview: {path.parent / 'preview.png'})")
        return 0
    if args.action == "align":
        import json

        from medflow.synthesis.align import align
        from medflow.synthesis.config import AlignConfig

        cfg = _config_from_args(AlignConfig, args)
        if args.source is not None and cfg.masks != "real":
            raise MedflowError(f"--source {args.source}: is read only with --real-masks")
        path = align(
            args.model,
            args.references,
            args.out,
            cfg,
            source=args.source,
            device=args.device,
            force=args.force,
            quiet=args.quiet,
        )
        summary = json.loads((path.parent / "align.json").read_text())
        print(
            f"wrote {path}: reward (feature MMD^2 to {summary['reference_slices']} reference "
            f"slice(s)) {summary['reward_before']:.4f} -> {summary['reward_after']:.4f}"
        )
        return 0
    from medflow.synthesis.model import SynthModel
    from medflow.synthesis.sample import real_pairs, sample_dataset

    masks = images = None
    if args.real_masks is not None:
        model = SynthModel.load(args.model)
        masks, images = real_pairs(args.real_masks, model, args.n, args.seed)
    meta = sample_dataset(
        args.model,
        args.out,
        args.n,
        seed=args.seed,
        steps=args.steps,
        batch_size=args.batch_size,
        per_case=args.per_case,
        include_source=args.include_source,
        masks=masks,
        images=images,
        device=args.device,
        force=args.force,
        quiet=args.quiet,
    )
    extra = meta["medflow"]
    print(
        f"wrote {args.out}: {extra['synthetic_pairs']} synthetic pairs in "
        f"{extra['synthetic_cases']} case(s)"
        + (f" + {extra['source_cases']} source cases" if extra["source_cases"] else "")
        + f"; preview {args.out / 'preview.png'}"
    )
    return 0


VERBS = {
    "synth": _synth,
    "datasets": _datasets,
    "plan": _plan,
    "train": _train,
    "predict": _predict,
    "evaluate": _evaluate,
    "report": _report,
    "export": _export,
    "bench": _bench,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one verb; returns the exit code (0 ok, 2 user error)."""
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # --help, --version, or a bad option (one line printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USER_ERROR
    # `medflow synth align: error: ...`: the stage is part of the command's name
    name = f"{args.verb} {args.action}" if args.verb == "synth" else args.verb
    try:
        return VERBS[args.verb](args)
    except MedflowError as exc:
        print(f"medflow {name}: error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:
        if exc.errno not in ENVIRONMENT_ERRNOS:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        problem = exc.strerror or str(exc)
        print(f"medflow {name}: error: {one_line(where + problem)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"medflow {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
