"""``fedfuse sites``: which registered site is online, by the name given at registration (the operator's view).

``flwr supernode ls`` shows node ids only, but the SuperLink keeps the ``--name`` of ``flwr supernode
register`` with each node. ``fedfuse sites`` lists the SuperNodes of a SuperLink connection by that name
(read through Flower's Control API, with the ``flwr`` CLI's connection and credentials), and
``fedfuse sites register KEY.pub ...`` registers keys under their file names (``fedfuse certs`` writes
``superlink/supernode-keys/<site>.pub``), so every node has a name.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from common.errors import ConfigError

HIDDEN_STATUS = "unregistered"  # listed with --all only


def configure(parser: argparse.ArgumentParser) -> None:
    """``fedfuse sites [--federation NAME] [--json] [--all]`` and ``fedfuse sites register KEY.pub ...``."""
    _connection_option(parser, None)
    parser.add_argument("--json", action="store_true", help="print the sites as JSON")
    parser.add_argument("--all", action="store_true", help="also list unregistered (removed) SuperNodes")
    sub = parser.add_subparsers(dest="sites_command", metavar="ACTION")
    reg = sub.add_parser(
        "register",
        help="register SuperNode public keys, each under its file name (flwr supernode register)",
        description="Register each public key at the SuperLink with `flwr supernode register`, named "
        "after its file (berlin.pub -> berlin) unless --name is given.",
    )
    reg.add_argument("keys", type=Path, nargs="+", metavar="KEY.pub", help="public keys (superlink/supernode-keys/<site>.pub)")
    reg.add_argument("--name", help="the site's name (one key only; default: the key file's name without .pub)")
    _connection_option(reg, argparse.SUPPRESS)


def _connection_option(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--federation",
        metavar="NAME",
        default=default,
        help="the SuperLink connection in $FLWR_HOME/config.toml (as for `flwr`; default: its default)",
    )


def run(args: argparse.Namespace) -> int:
    """List the sites, or register keys."""
    if args.sites_command == "register":
        return _register(args.keys, args.federation, args.name)
    nodes = list_nodes(args.federation, quiet=args.json)
    shown = [n for n in nodes if args.all or n["status"] != HIDDEN_STATUS]
    if args.json:
        print(json.dumps({"sites": shown}, indent=2))
    else:
        print(format_sites(shown))
    return 0


def list_nodes(federation: str | None, *, quiet: bool = False) -> list[dict[str, Any]]:
    """The SuperNodes registered at the SuperLink of ``federation``: name, node id, status, since when, sorted by name."""
    import click
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.utils import flwr_cli_exc_handler, init_http_client_from_connection
    from flwr.proto.control_pb2 import ListNodesRequest  # pylint: disable=E0611

    client = None
    try:
        with contextlib.redirect_stdout(sys.stderr if quiet else sys.stdout):  # Flower prints "Using SuperLink: ..."
            connection = read_superlink_connection(federation)
            client = init_http_client_from_connection(connection)
            with flwr_cli_exc_handler():
                response = client.ListNodes(ListNodesRequest())
    except click.ClickException as exc:
        raise ConfigError(f"cannot list the SuperNodes of {federation or 'the default connection'}: {exc.message}") from exc
    finally:
        if client is not None:
            client.close()
    nodes = [_node(info) for info in response.nodes_info]
    return sorted(nodes, key=lambda n: (n["name"] is None, n["name"] or "", n["node_id"]))


def _node(info: Any) -> dict[str, Any]:
    since = {"online": info.last_activated_at, "offline": info.last_deactivated_at, "unregistered": info.unregistered_at}.get(
        info.status
    ) or info.registered_at
    return {"name": info.name or None, "node_id": int(info.node_id), "status": info.status, "since": since or None}


def format_sites(nodes: list[dict[str, Any]]) -> str:
    """A table: site (registered name), node id, status, since; a count of online sites below."""
    rows = [("site", "node id", "status", "since")]
    for n in nodes:
        status = "registered (never connected)" if n["status"] == "registered" else n["status"]
        rows.append((n["name"] or "(no name)", str(n["node_id"]), status, (n["since"] or "")[:19].replace("T", " ")))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    online = sum(n["status"] == "online" for n in nodes)
    lines.append(f"{online} of {len(nodes)} site(s) online")
    if any(n["name"] is None for n in nodes):
        lines.append(
            "(no name): registered without --name; unregister it (flwr supernode unregister) and register "
            "it again with `fedfuse sites register KEY.pub` or `flwr supernode register ... --name SITE`"
        )
    return "\n".join(lines)


def _register(keys: list[Path], federation: str | None, name: str | None) -> int:
    if name is not None and len(keys) != 1:
        raise ConfigError("--name names one site: give one key with it, or leave it out to name each site after its file")
    flwr = shutil.which("flwr", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if flwr is None:
        raise ConfigError("the flwr command was not found: install fedfuse (with flwr) in this environment")
    failed = 0
    for key in keys:
        site = name or key.name.removesuffix(".pub")
        command = [
            flwr,
            "supernode",
            "register",
            str(key),
            *([federation] if federation else []),
            "--name",
            site,
            "--format",
            "json",
        ]
        done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        try:
            reply = json.loads(done.stdout[done.stdout.index("{") :])
        except ValueError:
            reply = {}
        if done.returncode == 0 and reply.get("success"):
            print(f"{site}: registered as SuperNode {reply.get('node-id')}")
        else:
            failed += 1
            reason = reply.get("error-message") or (done.stderr or done.stdout).strip()
            print(f"{site}: not registered ({key}): {reason}", file=sys.stderr)
    return 1 if failed else 0
