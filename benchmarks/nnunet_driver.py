"""nnU-Net v2 trained for a CPU-time budget, then predicting a folder: run by nnU-Net's own
Python (its environment, not medflow's), from ``benchmarks/nnunet.py``.

``nnUNetv2_train`` trains a fixed 1000 epochs of 250 iterations and, with ``-device cpu``,
sets torch to every core; a budget on one thread needs a trainer of our own. The subclass
below keeps nnU-Net's plan, network, data loader, augmentation, loss (Dice + CE with deep
supervision), SGD and its poly learning rate, and changes only the length of the run, as
``medflow train --time-budget`` does: the first ``PROBE`` iterations are timed (the first is
not counted) with one validation iteration, the total number of iterations is fixed to what
fits the budget, and the poly schedule ``lr = lr0 (1 - i / total) ** 0.9`` runs over that
total, per iteration (nnU-Net's own 1000 epochs make a near-continuous staircase; a budget
of a few hundred iterations would make it one or two steps per epoch). Epochs keep nnU-Net's
250 iterations and 50 validation iterations (pro rata for the last, shorter one). The budget
counts this process's CPU time (so jobs sharing the machine do not shorten the run), training
and validation from the first iteration, after nnU-Net's set-up (data
loaders, unpacking), and not the final checkpoint nor prediction.

    nnUNet_raw=... nnUNet_preprocessed=... nnUNet_results=... nnUNet_n_proc_DA=0 \\
    python benchmarks/nnunet_driver.py --dataset 501 --budget-seconds 240 --seed 0 \\
        --images DATA/imagesTs --pred OUT/pred --record OUT/nnunet.json

The environment variables are nnU-Net's (it reads them at import); ``nnUNet_n_proc_DA=0``
makes augmentation run in this process, so the run uses ``--threads`` cores and no more.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

PROBE = 6  # iterations timed before the budget fixes the total (the first is not)
# the budget counts this process's CPU time (all threads), as medflow's budget_clock="cpu":
# jobs sharing the machine do not eat it
CLOCK = time.process_time
VAL_RATIO = 50 / 250  # nnU-Net's validation iterations per training iteration
EPOCH = 250  # nnU-Net's iterations per epoch


def budget_trainer():
    """The trainer class (imported late: nnU-Net reads its environment at import)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class nnUNetTrainerTimeBudget(nnUNetTrainer):
        """nnUNetTrainer whose run ends at ``budget_seconds`` (set after construction:
        nnUNetTrainer records its ``__init__`` arguments by name, so no new ones)."""

        budget_seconds: float = 240.0

        def run_training(self) -> None:
            self.iteration, self.total_iterations = 0, None
            self.on_train_start()
            self.t_start = CLOCK()
            while self.total_iterations is None or self.iteration < self.total_iterations:
                self.on_epoch_start()
                self.on_train_epoch_start()
                outputs = []
                while len(outputs) < EPOCH and not self._done():
                    outputs.append(self.train_step(next(self.dataloader_train)))
                self.on_train_epoch_end(outputs)
                with torch.no_grad():
                    self.on_validation_epoch_start()
                    n_val = max(1, round(len(outputs) * VAL_RATIO))
                    val = [self.validation_step(next(self.dataloader_val)) for _ in range(n_val)]
                    self.on_validation_epoch_end(val)
                self.on_epoch_end()
            self.train_seconds = CLOCK() - self.t_start
            self.on_train_end()

        def _done(self) -> bool:
            return self.total_iterations is not None and self.iteration >= self.total_iterations

        def on_train_epoch_start(self) -> None:
            # nnU-Net's, with the learning rate of this iteration rather than this epoch
            self.network.train()
            self._set_lr()
            self.print_to_log_file("")
            self.print_to_log_file(f"Epoch {self.current_epoch}")
            self.logger.log("lrs", self.optimizer.param_groups[0]["lr"], self.current_epoch)

        def _set_lr(self) -> None:
            # before the total is known the run is at iteration < PROBE: lr0 (poly at 0)
            self.lr_scheduler.max_steps = self.total_iterations or 10**9
            self.lr_scheduler.step(self.iteration)

        def train_step(self, batch: dict) -> dict:
            self._set_lr()
            out = super().train_step(batch)
            self.iteration += 1
            if self.iteration == 1:
                self.t_first = CLOCK()
            if self.iteration == PROBE:
                self._fit_budget()
            return out

        def _fit_budget(self) -> None:
            per_iteration = (CLOCK() - self.t_first) / (PROBE - 1)
            t0 = CLOCK()
            self.network.eval()
            with torch.no_grad():
                self.validation_step(next(self.dataloader_val))
            self.network.train()
            per_val = CLOCK() - t0
            left = self.budget_seconds - (CLOCK() - self.t_start)
            fit = int(max(0.0, left) / (per_iteration + VAL_RATIO * per_val))
            self.total_iterations = self.iteration + fit
            self.num_epochs = math.ceil(self.total_iterations / EPOCH)
            self.seconds_per_iteration, self.seconds_per_val = per_iteration, per_val
            self.print_to_log_file(
                f"time budget {self.budget_seconds:.0f} s: {per_iteration:.3f} s per iteration, "
                f"{per_val:.3f} s per validation iteration -> {self.total_iterations} iterations"
            )

    return nnUNetTrainerTimeBudget


def train(args: argparse.Namespace):
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    base = join(nnUNet_preprocessed, maybe_convert_to_dataset_name(args.dataset))
    plans = load_json(join(base, "nnUNetPlans.json"))
    plans["continue_training"] = False
    fold = args.fold if args.fold == "all" else int(args.fold)
    trainer = budget_trainer()(
        plans=plans,
        configuration=args.configuration,
        fold=fold,
        dataset_json=load_json(join(base, "dataset.json")),
        device=torch.device("cpu"),
    )
    trainer.budget_seconds = args.budget_seconds
    trainer.run_training()
    return trainer


def predict(trainer, images: Path, pred: Path) -> float:
    """Predict ``images`` with the final weights as nnU-Net's own validation does (sliding
    window, Gaussian weighting, mirroring), in this process; seconds taken."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=True,
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        allow_tqdm=False,
    )
    # manual initialisation: the checkpoint names our trainer class, which nnU-Net's
    # trainer lookup (inside the nnunetv2 package) would not find
    predictor.manual_initialization(
        trainer.network,
        trainer.plans_manager,
        trainer.configuration_manager,
        [trainer.network.state_dict()],
        trainer.dataset_json,
        trainer.__class__.__name__,
        trainer.inference_allowed_mirroring_axes,
    )
    pred.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    predictor.predict_from_files_sequential(str(images), str(pred), overwrite=True)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", required=True, help="nnU-Net dataset id or DatasetNNN_Name")
    ap.add_argument("--configuration", default="2d")
    ap.add_argument("--fold", default="0", help="0-4 or all")
    ap.add_argument("--budget-seconds", type=float, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--images", type=Path, required=True, help="folder to predict")
    ap.add_argument("--pred", type=Path, required=True)
    ap.add_argument("--record", type=Path, required=True)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    # nnU-Net has no seed of its own: its loader and augmentation draw from these
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    trainer = train(args)
    predict_seconds = predict(trainer, args.images, args.pred)
    record = {
        "nnunetv2": version("nnunetv2"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "configuration": args.configuration,
        "fold": args.fold,
        "seed": args.seed,
        "budget_seconds": args.budget_seconds,
        "train_seconds": trainer.train_seconds,
        "train_steps": trainer.iteration,
        "epochs": trainer.current_epoch,
        "seconds_per_iteration": trainer.seconds_per_iteration,
        "seconds_per_val_iteration": trainer.seconds_per_val,
        "predict_seconds": predict_seconds,
        "patch": list(map(int, trainer.configuration_manager.patch_size)),
        "batch": int(trainer.batch_size),
        "output_folder": trainer.output_folder,
    }
    args.record.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
