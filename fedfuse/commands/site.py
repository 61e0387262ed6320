"""``fedfuse site``: run a deployment site's SuperNode with a warm executor (ClientApps start in 0.2 s, not 3-20 s).

``fedfuse site supernode -- <flower-supernode options>`` starts Flower's SuperNode (``flower-supernode``, its
loop's fixed waits shortened: ``client/supernode.py``) with ``--isolation process`` and a private SuperExec
secret, runs the warm executor
(``client/executor.py``) beside it in this process, sends both logs to this process's output and
stops both together. Before starting anything it checks the node config, the data folder and the state folder
(``client/preflight.py``) and refuses to start with the report; when flower-supernode cannot connect to the
SuperLink it names the likely causes. ``fedfuse site executor --runtime-api-address ADDR`` is the executor alone,
for a ``flower-supernode --isolation process`` started some other way. Either runs only apps whose code
is the fedfuse checkout installed here (``common/provenance.py``).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO

from common.errors import ConfigError
from common.logs import setup_flower_logging

log = logging.getLogger("fedfuse.site")
STOP_GRACE = 15.0  # seconds the SuperNode gets to stop after SIGTERM
FORWARD_AFTER = 3.0  # seconds to let a SuperNode that got the signal too stop by itself before sending it one


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``fedfuse site supernode`` and ``fedfuse site executor``."""
    sub = parser.add_subparsers(dest="site_command", metavar="COMMAND", required=True)
    node = sub.add_parser(
        "supernode",
        help="flower-supernode --isolation process + the warm executor (takes flower-supernode's options)",
        description="Start flower-supernode with the given options plus --isolation process, and the warm executor "
        "beside it. Every option not listed here goes to flower-supernode unchanged (see flower-supernode --help).",
    )
    _executor_options(node)
    node.add_argument(
        "--pull-wait",
        type=float,
        default=None,
        metavar="S",
        help="seconds the SuperNode waits after a pull that found no message (default: 0.2; Flower's: 3)",
    )
    node.add_argument(
        "--reply-wait",
        type=float,
        default=None,
        metavar="S",
        help="seconds between its checks for a ClientApp's reply (default: 0.05; Flower's: 0.5)",
    )
    node.add_argument(
        "flower_args",
        nargs=argparse.REMAINDER,
        metavar="-- FLOWER_SUPERNODE_OPTIONS",
        help="after `--`: flower-supernode's options (--superlink, --root-certificates, ...)",
    )
    node.set_defaults(_run=_run_supernode)
    exe = sub.add_parser("executor", help="the warm executor alone, for a running flower-supernode --isolation process")
    exe.add_argument(
        "--runtime-api-address",
        required=True,
        metavar="HOST:PORT",
        help="the SuperNode's Runtime API (its --host:--port, default 127.0.0.1:9094)",
    )
    exe.add_argument(
        "--root-certificates",
        type=Path,
        metavar="PEM",
        help="CA of the Runtime API's TLS certificate (when the SuperNode has --ssl-* files)",
    )
    exe.add_argument(
        "--superexec-auth-secret-file",
        type=Path,
        metavar="FILE",
        help="the same secret file as the SuperNode's --superexec-auth-secret-file",
    )
    _executor_options(exe)
    exe.set_defaults(_run=_run_executor)


def _executor_options(parser: argparse.ArgumentParser) -> None:
    from client.executor import DEFAULT_PRELOAD, POLL_INTERVAL

    parser.add_argument(
        "--poll", type=float, default=POLL_INTERVAL, help=f"seconds between task requests (default: {POLL_INTERVAL})"
    )
    parser.add_argument(
        "--preload",
        default=",".join(DEFAULT_PRELOAD),
        metavar="MODULES",
        help="comma-separated modules imported once before any task (default: %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    """Dispatch to the chosen site command."""
    setup_flower_logging(verbose=args.verbose)  # fedfuse's lines and the rest: the CLI's set-up (common/logs.py)
    return int(args._run(args))


def _run_executor(args: argparse.Namespace) -> int:
    from client.executor import WarmExecutor, preload

    secret = args.superexec_auth_secret_file.read_bytes() if args.superexec_auth_secret_file else None
    executor = WarmExecutor(
        args.runtime_api_address, root_certificates=args.root_certificates, auth_secret=secret, poll=args.poll
    )
    log.info("preloaded %s in %.1f s", args.preload, preload(_modules(args.preload)))
    executor.serve()
    return 0


def _modules(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def _supernode_facts(flower_args: list[str]) -> argparse.Namespace:
    """The flower-supernode options this command needs to know (the rest passes through)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9094)
    p.add_argument("--isolation")
    p.add_argument("--superexec-auth-secret-file")
    p.add_argument("--ssl-ca-certfile")
    p.add_argument("--superlink", default="127.0.0.1:8000")  # flower-supernode's default
    p.add_argument("--root-certificates")
    p.add_argument("--auth-supernode-private-key")
    p.add_argument("--insecure", action="store_true")
    known, _ = p.parse_known_args(flower_args)
    if known.isolation not in (None, "process"):
        raise ConfigError(
            f"fedfuse site supernode runs flower-supernode with --isolation process; remove "
            f"--isolation {known.isolation} (or run flower-supernode yourself)"
        )
    return known


def _die_with_parent() -> None:
    """In the SuperNode's process, before exec: get SIGTERM when this command dies (Linux), never outlive it."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stop_supernode(proc: subprocess.Popen) -> None:
    """Let the SuperNode deactivate itself at the SuperLink, then make sure it has stopped.

    A signal to the whole process group (Ctrl-C, systemd) reaches it already; a second SIGTERM during its
    graceful exit would kill it before it tells the SuperLink it is leaving (then it cannot rejoin for ~60 s).
    """
    try:
        proc.wait(FORWARD_AFTER)
        return
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _run_supernode(args: argparse.Namespace) -> int:
    from client.executor import WarmExecutor, check_flower_version, preload
    from common.provenance import ReviewedApp

    flower_args = list(args.flower_args)
    if flower_args[:1] == ["--"]:
        flower_args = flower_args[1:]
    if not flower_args:
        raise ConfigError(
            "give flower-supernode's options after `--`, e.g. fedfuse site supernode -- --superlink "
            "HOST:9093 --root-certificates ca.crt --auth-supernode-private-key auth.key --node-config ..."
        )
    check_flower_version()
    reviewed = ReviewedApp.installed()  # the app code this site accepts (refuses to start without a checkout)
    facts = _supernode_facts(flower_args)
    _check_site_folders(flower_args)
    host = "127.0.0.1" if facts.host in ("0.0.0.0", "") else facts.host
    address = f"{host}:{facts.port}"
    secret_dir = None
    if facts.superexec_auth_secret_file is None:  # a fresh secret per start: only our executor gets task tokens
        secret_dir = Path(tempfile.mkdtemp(prefix="fedfuse-site-"))
        secret_file = secret_dir / "superexec.secret"
        fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
        flower_args += ["--superexec-auth-secret-file", str(secret_file)]
    else:
        secret_file = Path(facts.superexec_auth_secret_file)
    if facts.isolation is None:
        flower_args += ["--isolation", "process"]

    # Flower's own SuperNode, its loop's fixed 3 s / 0.5 s waits shortened (client/supernode.py)
    from client.supernode import PULL_WAIT, REPLY_WAIT, shorten_waits

    pull = PULL_WAIT if args.pull_wait is None else args.pull_wait
    reply = REPLY_WAIT if args.reply_wait is None else args.reply_wait
    shorten_waits(pull=pull, reply=reply)  # the same checks as in the SuperNode's process: refuse here, early
    command = [sys.executable, "-m", "client.supernode", "--pull-wait", str(pull), "--reply-wait", str(reply), "--", *flower_args]
    proc = subprocess.Popen(
        command,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )
    watch = _OutputWatch(proc.stdout, sys.stderr)  # its log goes on to ours; a connection failure is spotted
    log.info("started flower-supernode (pid %d) with --isolation process; Runtime API %s", proc.pid, address)
    try:
        executor = WarmExecutor(
            address,
            auth_secret=secret_file.read_bytes(),
            root_certificates=Path(facts.ssl_ca_certfile) if facts.ssl_ca_certfile else None,
            poll=args.poll,
            reviewed=reviewed,
        )
        log.info("preloaded %s in %.1f s", args.preload, preload(_modules(args.preload)))
        executor.serve(keep_going=lambda: proc.poll() is None)
    finally:
        _stop_supernode(proc)
        if secret_dir is not None:
            shutil.rmtree(secret_dir, ignore_errors=True)
    watch.join()
    if proc.returncode:
        log.error("flower-supernode exited with status %d (its log is above)", proc.returncode)
        if watch.connection_failed:
            log.error("%s", connection_hint(facts, watch.after_failure))
    return 1 if proc.returncode else 0


def _check_site_folders(flower_args: list[str]) -> None:
    """Refuse to start (before Flower runs) when the node config, data folder or state folder is not usable."""
    from client.preflight import check_start, node_config_from_args

    report = check_start(node_config_from_args(flower_args))
    if report.problems:
        raise ConfigError(
            f"this site is not ready to start ({len(report.problems)} problem(s)); flower-supernode was "
            "not started:\n  " + "\n  ".join(report.problems)
        )
    for fact in report.facts:
        log.info("checked %s", fact)


# flower-supernode logs "Exit Code: 305" (ExitCode.SUPERNODE_CONNECTION_ERROR, flwr/supercore/exit/exit_code.py) and
# exits with status 1 when it could not activate at the SuperLink (flwr/supernode/fleet_http_connection.py).
CONNECTION_ERROR_MARK = "Exit Code: 305"


class _OutputWatch:
    """Copy a process's output line by line and remember what follows Flower's connection-failure exit code."""

    def __init__(self, source: IO[bytes], sink: IO[str]):
        self.connection_failed = False
        self.after_failure: list[str] = []
        self._source, self._sink = source, sink
        self._thread = threading.Thread(target=self._copy, name="flower-supernode-output", daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        for raw in iter(self._source.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            try:
                self._sink.write(line)
                self._sink.flush()
            except (OSError, ValueError):
                pass
            if CONNECTION_ERROR_MARK in line:
                self.connection_failed = True
            elif self.connection_failed and len(self.after_failure) < 20:
                self.after_failure.append(line.rstrip())

    def join(self, timeout: float = 10.0) -> None:
        self._thread.join(timeout)


def connection_hint(facts: argparse.Namespace, detail: list[str]) -> str:
    """What to check when flower-supernode could not connect to the SuperLink, the cause Flower's message points to first."""
    text = "\n".join(detail).lower()
    address = facts.superlink
    key = facts.auth_supernode_private_key
    causes = {
        # An unknown key gets "[code: 2004] Failed to activate SuperNode." (HTTP 412); so does a site restarted after
        # a crash while the SuperLink still counts it online
        "key": (
            ("failed to activate", "code: 2004", "412", "no supernode found", "public key", "not registered"),
            "this site's key is not registered at the SuperLink: the operator registers its public key "
            "(`fedfuse sites register <site>.pub` or `flwr supernode register <site>.pub <connection> --name "
            "<site>`; `fedfuse certs` wrote it to superlink/supernode-keys/)"
            + (f"; this site signs with {key}" if key else "")
            + ". (After a crash the SuperLink also refuses the site until it has marked it offline, under a "
            "minute: then start it again.)",
        ),
        "ca": (
            ("certificate", "ssl", "tls", "handshake"),
            f"wrong CA certificate: --root-certificates ({facts.root_certificates or 'not given'}) must be the "
            f"ca.crt that `fedfuse certs` wrote for this federation, and the SuperLink's certificate must name "
            f"the host in --superlink",
        ),
        "down": (
            (
                "connection refused",
                "connecterror",
                "connect error",
                "timed out",
                "timeout",
                "name or service",
                "nodename",
                "unreachable",
                "no route",
            ),
            f"the SuperLink is down or the address is wrong: is flower-superlink running and reachable at "
            f"{address} (--superlink HOST:PORT)?",
        ),
    }
    if facts.insecure:  # no TLS, no node authentication: neither a key nor a CA can be the cause
        causes = {"down": causes["down"]}
    elif not key:
        del causes["key"]
    order = sorted(causes, key=lambda c: not any(w in text for w in causes[c][0]))  # the cause the message points to first
    lines = [
        f"flower-supernode could not connect to the SuperLink at {address}. "
        + ("Likely causes:" if len(order) > 1 else "Likely cause:")
    ]
    lines += [f"  - {causes[c][1]}" for c in order]
    return "\n".join(lines)
