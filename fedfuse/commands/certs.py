"""``fedfuse certs``: create the CA, the SuperLink's TLS certificate and every site's keys."""

from __future__ import annotations

import argparse

from common.certs import make_credentials


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``fedfuse certs``."""
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write the credentials to")
    parser.add_argument(
        "--server-names",
        required=True,
        metavar="NAMES",
        help="comma-separated addresses sites use to reach the SuperLink; IPs become IP SANs, "
        "others DNS SANs (e.g. 'superlink.example.org'); 127.0.0.1 is always added, for the SuperLink's "
        "own SuperExec",
    )
    parser.add_argument(
        "--sites",
        required=True,
        metavar="N|NAMES",
        help="number of sites (3 -> site-1..site-3) or comma-separated site names",
    )
    parser.add_argument("--days", type=int, default=365, help="certificate lifetime in days (default: 365)")
    parser.add_argument("--force", action="store_true", help="replace existing credential files")


def run(args: argparse.Namespace) -> int:
    """Write the credentials and print which files go to which machine."""
    creds = make_credentials(args.out, server_names=args.server_names, sites=args.sites, days=args.days, force=args.force)
    print(creds.manifest.read_text(encoding="utf-8"), end="")
    print(f"(this list is also in {creds.manifest})")
    return 0
