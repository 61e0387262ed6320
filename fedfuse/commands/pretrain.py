"""``fedfuse pretrain``: train one modality's encoder on a PUBLIC site folder (no DP), for ``model.init``."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.errors import ConfigError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Train the encoder of one modality, without differential privacy, on a site folder of "
        "PUBLIC data, and write its weights (safetensors) and a JSON description beside them. "
        'Warm-start a run\'s fresh encoders from it with model.init = "MODALITY=FILE". Never '
        "use it on private data: nothing here is clipped, noised or accounted."
    )
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="a site folder of public data ('train' samples; 'test' samples, if any, are scored)",
    )
    parser.add_argument("--modality", required=True, help="the modality whose encoder to train (e.g. image)")
    parser.add_argument("--out", type=Path, required=True, help="the weights file to write (e.g. mnist-cnn.safetensors)")
    parser.add_argument(
        "--encoder",
        default="default",
        help="the run's model.encoder choice for this modality (a built-in name or package.module:factory; default: the kind's)",
    )
    parser.add_argument("--embed-dim", type=int, default=32, help="the run's model.embed-dim (default 32)")
    parser.add_argument("--norm", choices=("none", "group", "layer"), default="none", help="the run's model.norm (default none)")
    parser.add_argument("--width", type=int, default=0, help="the run's model.width (default 0: the encoder's default)")
    parser.add_argument("--epochs", type=int, default=5, help="passes over the training samples (default 5)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and shuffling (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing weights file")


def run(args: argparse.Namespace) -> int:
    from common.data.site_folders import load_site
    from common.model.pretrain import PretrainConfig, pretrain_encoder
    from common.model.validation import check_encoder
    from common.model.warm_start import description_path, save_encoder_weights

    if args.out.exists() and not args.overwrite:
        raise ConfigError(f"{args.out} exists; choose another --out or pass --overwrite")
    config = PretrainConfig(
        encoder=args.encoder,
        embed_dim=args.embed_dim,
        norm=args.norm,
        width=args.width,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
    )
    site = load_site(args.data)
    train = site.part("train")
    if train is None:
        raise ConfigError(f"site folder {args.data} has no 'train' samples")
    if args.modality in train.schema.names and config.encoder != "default":  # the run will refuse it anyway: say so now
        spec = train.schema.modalities[train.schema.names.index(args.modality)]
        check_encoder(spec, config.embed_dim, config.encoder, "hooks")
    encoder, description = pretrain_encoder(train, site.part("test"), args.modality, config)
    description["trained_on"]["site"] = site.name
    save_encoder_weights(args.out, encoder, description)
    accuracy = description.get("test_accuracy")
    print(
        f"wrote {args.out} and {description_path(args.out)}: encoder of '{args.modality}' "
        f"({config.encoder}, embed-dim {config.embed_dim}) trained on {description['trained_on']['train_samples']} "
        f"public samples of {site.name}" + (f", test accuracy {100 * accuracy:.1f} %" if accuracy is not None else "")
    )
    print(f'use it with: model.init = "{args.modality}={args.out.resolve()}"')
    return 0
