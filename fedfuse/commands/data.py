"""``fedfuse data``: validate site folders, import public datasets into them, write synthetic demo sites."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from common.errors import DataError, SchemaError


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``validate``, ``import`` and ``synth`` subcommands."""
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    p = sub.add_parser("validate", help="check a site folder (or a folder of site folders); list every problem")
    p.add_argument("dir", type=Path, help="a site folder, or a folder whose sub-folders are sites")
    p.add_argument("--json", action="store_true", help="print problems or summaries as JSON")

    i = sub.add_parser("inspect", help="show each modality's value range (locally: nothing is sent) to catch unit mistakes")
    i.add_argument("dir", type=Path, help="a site folder, or a folder whose sub-folders are sites")
    i.add_argument("--json", action="store_true", help="print the ranges and notes as JSON")

    imp = sub.add_parser("import", help="turn a public dataset into site folders")
    which = imp.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    h = which.add_parser("hapt", help="HAPT (UCI): acc + gyro windows, one site per subject")
    h.add_argument("--source", type=Path, required=True, help="the HAPT folder (with RawData/, Train/, Test/)")
    h.add_argument("--out", type=Path, required=True, help="folder to write the site folders into")
    h.add_argument(
        "--classes",
        type=int,
        choices=(6, 12),
        default=6,
        help="6: the UCI HAR activities; 12: with the postural transitions (default 6)",
    )
    h.add_argument(
        "--holdout", type=float, default=0.2, help="share of each training subject's windows marked 'test' (every 5th for 0.2)"
    )
    h.add_argument("--overwrite", action="store_true", help="replace existing site folders")
    a = which.add_parser("av-digits", help="FSDD audio + MNIST images, one site per speaker")
    a.add_argument("--fsdd", type=Path, required=True, help="the FSDD folder (with recordings/)")
    a.add_argument("--mnist", type=Path, required=True, help="folder with the MNIST t10k IDX .gz files")
    a.add_argument("--out", type=Path, required=True, help="folder to write the site folders into")
    a.add_argument("--seed", type=int, default=0, help="seed of the clip-to-image pairing (default 0)")
    a.add_argument("--overwrite", action="store_true", help="replace existing site folders")
    u = which.add_parser(
        "mnist-unpaired",
        help="the MNIST images AV-Digits does not use, as one public site folder "
        "(to pretrain an image encoder: fedfuse pretrain)",
    )
    u.add_argument("--fsdd", type=Path, required=True, help="the FSDD folder (with recordings/)")
    u.add_argument("--mnist", type=Path, required=True, help="folder with the MNIST t10k IDX .gz files")
    u.add_argument("--out", type=Path, required=True, help="folder to write the site folder 'mnist-unpaired' into")
    u.add_argument("--seed", type=int, default=0, help="the AV-Digits pairing seed whose images to leave out (default 0)")
    u.add_argument("--overwrite", action="store_true", help="replace an existing site folder")

    from common.data.synthetic_sites import SPEC_HELP

    s = sub.add_parser(
        "synth",
        help="write site folders of the synthetic dataset (demos, trying a deployment)",
        description="Write one site folder per site, each holding only the modalities named, with "
        "'train' (80 %) and 'test' (20 %) samples of the embedded synthetic dataset.",
    )
    s.add_argument("--out", type=Path, required=True, help="a new (or empty) folder to write the site folders into")
    s.add_argument("--sites", required=True, metavar="SPEC", help=SPEC_HELP)
    s.add_argument("--samples", type=int, default=240, help="samples per site (default 240)")
    s.add_argument("--seed", type=int, default=0, help="site k (from 0, in --sites order) uses seed SEED + k (default 0)")


def run(args: argparse.Namespace) -> int:
    """Run ``fedfuse data <action>``; returns the exit status."""
    if args.data_command == "validate":
        return _validate(args.dir, as_json=args.json)
    if args.data_command == "inspect":
        return _inspect(args.dir, as_json=args.json)
    if args.data_command == "synth":
        return _synth(args)
    if args.dataset == "hapt":
        from common.data.importers.hapt import import_hapt

        paths = import_hapt(args.source, args.out, classes=args.classes, holdout=args.holdout, overwrite=args.overwrite)
    elif args.dataset == "mnist-unpaired":
        from common.data.importers.av_digits import import_unpaired_mnist

        paths = [import_unpaired_mnist(args.fsdd, args.mnist, args.out, seed=args.seed, overwrite=args.overwrite)]
    else:
        from common.data.importers.av_digits import import_av_digits

        paths = import_av_digits(args.fsdd, args.mnist, args.out, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {len(paths)} site folder(s) under {args.out}")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from common.data import synthetic
    from common.data.synthetic_sites import parse_sites, write_synthetic_sites

    sites = parse_sites(args.sites)
    if not args.verbose:  # its per-site lines name the hidden folder the sites are built in; ours below name the result
        logging.getLogger("common.data.site_folders").setLevel(logging.WARNING)
    paths = write_synthetic_sites(args.out, sites, samples=args.samples, seed=args.seed)
    for name, path in paths.items():
        print(f"{name}: {path} ({'+'.join(sites[name])}, {args.samples} samples)")
    used = [m for m in synthetic.schema(text=True).names if any(m in mods for mods in sites.values())]
    print(
        f"wrote {len(paths)} site folder(s) under {args.out}; a run over them needs "
        f'federation.modalities = "{",".join(used)}" and federation.labels = "{",".join(synthetic.LABELS)}"'
    )
    return 0


def _folders(path: Path) -> list[Path]:
    """A folder with schema.json is a site; otherwise its sub-folders are."""
    from common.data.site_folders import SCHEMA_FILE, site_folders

    if not path.is_dir():
        raise DataError(f"{path} is not a folder; give a site folder or a folder of site folders")
    return [path] if (path / SCHEMA_FILE).exists() or not site_folders(path) else site_folders(path)


def _inspect(path: Path, *, as_json: bool) -> int:
    from common.data.site_folders import load_site
    from common.data.value_ranges import modality_ranges, range_notes

    ranges = {site.name: modality_ranges(site) for site in map(load_site, _folders(path))}
    notes = range_notes(ranges)
    if as_json:
        print(json.dumps({"sites": {k: [r.to_dict() for r in v] for k, v in ranges.items()}, "notes": notes}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Value ranges over present samples, as the encoders see them (after the schema's scaling)")
    for column in ("site", "modality", "present", "min", "1%", "mean", "std", "99%", "max", "scaling"):
        table.add_column(column, justify="left" if column in ("site", "modality", "scaling") else "right")
    for site, rs in ranges.items():
        for r in rs:
            table.add_row(
                site,
                r.modality,
                str(r.present),
                *(f"{v:.4g}" for v in (r.min, r.p01, r.mean, r.std, r.p99, r.max)),
                "declared" if r.scaled else "none",
            )
    Console(width=None if sys.stdout.isatty() else 140).print(table)
    for note in notes:
        print(f"note: {note}")
    print("computed here from the sites' records and shown only here; nothing is sent or changed")
    return 0


def _validate(path: Path, *, as_json: bool) -> int:
    from common.data.site_folders import Problem, check_site, federation_schema, summarize_site

    folders = _folders(path)
    checked = {f.name: check_site(f) for f in folders}
    failed: dict[str, list[Problem]] = {k: problems for k, (_, problems) in checked.items() if problems}
    sites = [site for site, _ in checked.values() if site is not None]
    extra: list[str] = []
    if not failed:
        try:
            federation_schema(sites)
        except SchemaError as exc:
            extra.append(str(exc))
    if failed or extra:
        if as_json:
            report = {"problems": {k: [vars(p) for p in v] for k, v in failed.items()}, "federation": extra}
            print(json.dumps(report, indent=2))
        else:
            for name, found in failed.items():
                prefix = f"{name}/" if len(folders) > 1 else ""
                for p in found:
                    print(f"{prefix}{p}")
            for message in extra:
                print(f"federation: {message}")
            count = sum(map(len, failed.values())) + len(extra)
            print(f"{count} problem(s) found")
        return 1
    summaries = [summarize_site(s) for s in sites]
    if as_json:
        print(json.dumps(summaries, indent=2))
    else:
        for s in summaries:
            print(_format_summary(s))
        print(f"{len(sites)} valid site(s)")
    return 0


def _format_summary(s: dict) -> str:
    from common.data.site_folders import TRAIN_SPLIT, split_hint

    splits = ", ".join(f"{k} {v}" for k, v in s["splits"].items())
    roles = "; ".join(f"{k}: {v}" for k, v in s["split_roles"].items())
    presence = ", ".join(f"{k} {v}" for k, v in s["presence"].items())
    classes = ", ".join(f"{k} {v}" for k, v in s["classes"].items())
    lines = [f"{s['name']}: {s['samples']} samples ({splits})", f"  splits: {roles}"]
    if TRAIN_SPLIT not in s["splits"]:
        lines.append(
            f"  note: no '{TRAIN_SPLIT}' samples: in a simulation this site takes no part in training"
            + (f" ({hint})" if (hint := split_hint(list(s["splits"]))) else "")
        )
    elif hint := split_hint(list(s["splits"])):
        lines.append(f"  note: {hint}")
    if s["splits"].get(TRAIN_SPLIT):
        lines.append(f"  deploy: declare num-train-examples={s['splits'][TRAIN_SPLIT]} in the SuperNode's node config")
    return "\n".join(lines + [f"  presence: {presence}", f"  classes: {classes}"])
