"""In-process FedAvg on imported HAPT sites, for tuning and for questions the benchmark cannot ask cheaply.

Same data, model, DP-SGD round (`train_round`) and aggregation as `fedfuse bench hapt` with
``encoders = "federated"`` and p = 0, without Flower: every client trains every round, and the global
model's pooled macro-F1 is printed every few rounds: on the training subjects' own held-out windows (every
5th window of each training subject, ``--score validation``, the default: what to tune on) or on the
windows of the 9 test subjects (``--score test``: for reporting a configuration already chosen, never
for choosing one). The accuracy levers are options: ``--transforms`` (``model.transforms``),
``--augmentations`` and ``--multiplicity`` (``train.augmentations``, ``train.multiplicity``),
``--server-opt`` and ``--server-lr`` (``strategy``, ``server-lr``), ``--norm`` and ``--width`` (``model.norm``,
``model.width``), ``--ema`` (``ema-decay``: the EMA of the global parameters is what gets scored).
``--standardise`` compares input standardisations (docs/benchmarks.md, "Input standardisation"):

  none    the raw signals (what the product trains on)
  window  each window divided by its own per-channel std (a per-sample transform: DP-safe)
  pooled  one per-channel mean/std over all training windows of all subjects (NOT private: pooled data)
  site    each subject's own per-channel mean/std (NOT covered by DP-SGD's guarantee: statistics of
          the site's data shift every sample; a product version would have to release them with DP)
  dp:SIGMA:BOUND  "site" with the statistics released by the Gaussian mechanism (noise multiplier
          SIGMA; per-window channel means clamped to ±BOUND, second moments to [0, BOUND²])

    fedfuse data import hapt --source HAPT_DIR --out SITES_DIR
    python simulations/tuning/hapt_fedavg.py SITES_DIR --standardise site --rounds 12
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from common.data.partition import heldout_sites
from common.data.samples import MultimodalData
from common.data.site_folders import federation_schema, load_site, site_folders
from common.model.evaluation import macro_f1, predict
from common.model.multimodal import ModelConfig, MultimodalModel
from common.privacy.accounting import PrivacyHistory
from common.privacy.augmentation import parse_augmentations
from common.privacy.training import DPRequest, LocalTraining, scheduled_lr, train_round
from server.aggregation import Contribution, weighted_average
from server.ema import ParameterEMA
from server.optimizer import build_optimizer

STANDARDISE = ("none", "window", "pooled", "site", "dp:SIGMA:BOUND")


def dp_statistics(x: torch.Tensor, *, sigma: float, bound: float, modalities: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of windows ``x`` (N, C, T) released with the Gaussian mechanism.

    Each window contributes [1, its channel means / bound, its channel second moments / bound²] (each
    coordinate in [-1, 1] after clamping), so one window moves the per-modality sum by at most
    √(1 + 2C), and a sample holding every modality by √(modalities) times that: the noise's scale.
    """
    channels = x.shape[1]
    a = x.mean(dim=2).clamp(-bound, bound) / bound
    b = (x**2).mean(dim=2).clamp(0, bound**2) / bound**2
    std = sigma * modalities**0.5 * (1 + 2 * channels) ** 0.5
    n = max(len(x) + float(torch.randn(()) * std), 1.0)
    mean = (a.sum(0) + torch.randn(channels) * std) * bound / n
    second = (b.sum(0) + torch.randn(channels) * std) * bound**2 / n
    var = (second - mean**2).clamp(min=1e-2)
    return mean[None, :, None], var.sqrt()[None, :, None]


def standardise(data: MultimodalData, how: str, names: list[str], pooled: dict | None = None) -> MultimodalData:
    if how == "none":
        return data
    inputs = {}
    for m, x in data.inputs.items():
        x, present = x.float(), data.mask[:, names.index(m)]
        if how == "site":
            mu, sd = x[present].mean(dim=(0, 2), keepdim=True), x[present].std(dim=(0, 2), keepdim=True) + 1e-6
        elif how.startswith("dp:"):
            mu, sd = dp_statistics(
                x[present], sigma=float(how.split(":")[1]), bound=float(how.split(":")[2]), modalities=len(names)
            )
        elif how == "window":
            mu, sd = 0.0, x.std(dim=2, keepdim=True) + 1e-3
        elif how == "pooled":
            mu, sd = pooled[m]
        else:
            raise SystemExit(f"--standardise must be one of {', '.join(STANDARDISE)}, got {how!r}")
        inputs[m] = torch.where(present[:, None, None], (x - mu) / sd, torch.zeros_like(x))
    return MultimodalData(data.schema, inputs, data.mask, data.labels)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sites", type=Path, help="a folder of HAPT site folders (fedfuse data import hapt --out)")
    p.add_argument("--standardise", default="none")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--epsilon", type=float, default=math.inf, help="per-client budget (default: non-private)")
    p.add_argument("--lr", type=float, default=0.4)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="initial weights and DP-SGD sampling")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--score",
        choices=("validation", "subjects", "test"),
        default="validation",
        help="validation: the training subjects' held-out windows (tune on this); subjects: every window of "
        "--val-subjects training subjects left out of training (new-subject generalisation, tune on this); "
        "test: the 9 test subjects (report only)",
    )
    p.add_argument("--val-subjects", type=int, default=4, help="with --score subjects: the last N training subjects")
    p.add_argument("--encoder", default="", help="model.encoder, e.g. acc=lstm;gyro=lstm")
    p.add_argument("--transforms", default="", help="model.transforms, e.g. acc=gravity+magnitude;gyro=magnitude")
    p.add_argument("--augmentations", default="", help="train.augmentations, e.g. acc+gyro=rotate(15)")
    p.add_argument("--multiplicity", type=int, default=1, help="train.multiplicity")
    p.add_argument("--server-opt", choices=("fedavg", "fedadam", "fedyogi"), default="fedavg")
    p.add_argument("--server-lr", type=float, default=0.05)
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant", help="train.lr-schedule")
    p.add_argument("--norm", choices=("none", "group", "layer"), default="none", help="model.norm")
    p.add_argument("--width", type=int, default=0, help="model.width (0 = the signal encoder's default, 32)")
    p.add_argument("--ema", type=float, default=0.0, help="ema-decay: score the EMA of the global parameters (0 = off)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    held_out = set(heldout_sites(args.sites))
    sites = [load_site(f) for f in site_folders(args.sites)]
    schema = federation_schema(sites)
    train_sites = [s for s in sites if s.path not in held_out]
    left_out = train_sites[-args.val_subjects :] if args.score == "subjects" else []
    train_sites = [s for s in train_sites if s not in left_out]
    pooled = None
    if args.standardise == "pooled":
        pooled = {}
        for m in schema.names:
            xs = torch.cat([s.part("train").inputs[m].float() for s in train_sites])
            pooled[m] = (xs.mean(dim=(0, 2), keepdim=True), xs.std(dim=(0, 2), keepdim=True))
    trains = [standardise(s.part("train"), args.standardise, schema.names, pooled) for s in train_sites]
    if args.score == "subjects":  # every window (train and held-out split) of subjects never trained on
        parts = [d for s in left_out for d in (s.part("train"), s.part("test")) if d is not None]
        tests = [standardise(d, args.standardise, list(schema.names), pooled) for d in parts]
    else:
        scored = [s for s in sites if (s.path in held_out) == (args.score == "test") and s.part("test") is not None]
        tests = [standardise(s.part("test"), args.standardise, schema.names, pooled) for s in scored]

    config = ModelConfig(
        "concat", 64, 64, args.transforms, args.encoder, norm=args.norm, width=args.width
    )  # simulations/scenarios/hapt.toml
    augmentation = parse_augmentations(args.augmentations, args.multiplicity)
    server = build_optimizer(args.server_opt, args.server_lr)
    torch.manual_seed(args.seed)
    global_state = MultimodalModel(schema, config).state_dict()
    models = [MultimodalModel(d.schema, config) for d in trains]
    histories = [PrivacyHistory() for _ in trains]
    ema = ParameterEMA(args.ema) if args.ema else None
    start = time.perf_counter()
    for r in range(1, args.rounds + 1):
        updates = []
        for data, model, history in zip(trains, models, histories):
            model.load_partial({k: v for k, v in global_state.items() if k in model.state_dict()})
            train_round(
                model,
                data,
                history,
                dp=DPRequest(args.epsilon, 1e-5, 1.0, planned_rounds=args.rounds),
                training=LocalTraining(
                    local_epochs=args.local_epochs,
                    batch_size=64,
                    momentum=0.9,
                    lr=scheduled_lr(args.lr, args.lr_schedule, r, args.rounds),
                    modality_dropout=0.3,
                    augmentation=augmentation,
                ),
                run_id="tuning",
            )
            updates.append(Contribution(model.state_dict(), float(len(data))))
        average, _ = weighted_average(updates)
        global_state = server.step(global_state, average)
        scored_state = ema.update(global_state) if ema else global_state  # clients keep training from global_state
        if r % 3 == 0 or r == args.rounds:
            model = MultimodalModel(schema, config)
            model.load_state_dict(scored_state)
            truth = torch.cat([d.labels for d in tests])
            pred = torch.cat([predict(model, d) for d in tests])
            print(
                f"round {r:3d}  {args.score} macro-F1 {macro_f1(truth, pred, schema.num_classes):.3f}  "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
