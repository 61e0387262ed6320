"""In-process FedAvg on AV-Digits' images, with and without an image encoder pretrained on public data.

Same data, model (simulations/scenarios/av-digits.toml: concat head, embedding 64, federated encoders),
DP-SGD round (`train_round`, ε = 8 per client) and aggregation as the image-only cell of `fedfuse bench
av-digits`, without Flower and Ray: every client trains every round; the global model's accuracy on the
pooled test takes of the six speakers is printed after every round, for a fresh encoder and for one
warm-started from ``--init`` (``model.init``; written by ``fedfuse pretrain``).

    fedfuse data import av-digits --fsdd FSDD --mnist MNIST --out AV_DIR
    fedfuse data import mnist-unpaired --fsdd FSDD --mnist MNIST --out PUBLIC
    fedfuse pretrain --data PUBLIC/mnist-unpaired --modality image --embed-dim 64 --out mnist-cnn.safetensors
    python simulations/tuning/av_digits_transfer.py AV_DIR --init mnist-cnn.safetensors --rounds 5
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from common.data.site_folders import load_site, site_folders
from common.model.evaluation import predict
from common.model.multimodal import ModelConfig, MultimodalModel
from common.model.warm_start import warm_start
from common.privacy.accounting import PrivacyHistory
from common.privacy.training import DPRequest, LocalTraining, train_round
from server.aggregation import Contribution, weighted_average


def _part(site, split: str):  # noqa: ANN001, ANN202
    part = site.part(split)
    if part is None:
        raise SystemExit(f"{site.name} has no {split} split: import AV-Digits with `fedfuse data import av-digits`")
    return part


def run(sites: Path, *, init: Path | None, rounds: int, epsilon: float, seed: int) -> list[float]:
    """Test accuracy of the global model after each round."""
    loaded = [load_site(f) for f in site_folders(sites)]
    trains = [_part(s, "train").restrict(["image"]) for s in loaded]
    tests = [_part(s, "test").restrict(["image"]) for s in loaded]
    schema = trains[0].schema
    config = ModelConfig("concat", 64, 64)
    global_model = MultimodalModel(schema, config, seed=seed)
    if init is not None:
        warm_start(global_model.encoders, {"image": str(init)})
    global_state = global_model.state_dict()
    models = [MultimodalModel(d.schema, config, seed=seed) for d in trains]
    histories = [PrivacyHistory() for _ in trains]
    accuracy = []
    for r in range(1, rounds + 1):
        updates = []
        for data, model, history in zip(trains, models, histories):
            model.load_state_dict(global_state)
            train_round(
                model,
                data,
                history,
                dp=DPRequest(epsilon, 1e-5, 1.0, planned_rounds=rounds),
                training=LocalTraining(local_epochs=5, batch_size=256, lr=0.8, momentum=0.9, modality_dropout=0.3),
                run_id="tuning",
            )
            updates.append(Contribution(model.state_dict(), float(len(data))))
        average, _ = weighted_average(updates)
        global_state.update(average)
        global_model.load_state_dict(global_state)
        truth = torch.cat([d.labels for d in tests])
        pred = torch.cat([predict(global_model, d) for d in tests])
        accuracy.append(float((pred == truth).float().mean()))
        print(
            f"{'warm' if init else 'fresh'}  round {r:2d}  test accuracy {100 * accuracy[-1]:.1f} %  "
            f"ε = {histories[0].epsilon():.2f}",
            flush=True,
        )
    return accuracy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sites", type=Path, help="the AV-Digits site folders (fedfuse data import av-digits)")
    p.add_argument("--init", type=Path, required=True, help="image encoder weights (fedfuse pretrain --embed-dim 64)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", choices=("warm", "fresh"), help="run one of the two settings (e.g. both in parallel)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    for init in (args.init, None):
        if args.only in (None, "warm" if init else "fresh"):
            run(args.sites, init=init, rounds=args.rounds, epsilon=args.epsilon, seed=args.seed)
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
