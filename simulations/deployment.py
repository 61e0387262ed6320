"""A real, local Flower deployment for tests and benchmarks: SuperLink with TLS + SuperNode auth, one SuperNode per site.

Everything runs on 127.0.0.1 with ports chosen at run time, each process with its own
``FLWR_HOME`` under the given folder, telemetry, update checks and runtime dependency
installation off, and each process in its own process group, all killed on exit::

    with deployment(tmp_path, sites=DEFAULT_SITES) as dep:
        run = dep.run({"num-server-rounds": 2})      # waits; raises RunFailed unless it completed
        run.results["rounds"], run.folder / "ledgers"
        dep.kill_site("site-2"); dep.restart_site("site-2"); dep.logs("site-2")

``isolation``: ``"warm"`` (``fedfuse site supernode``: --isolation process + the warm executor),
``"subprocess"`` (plain ``flower-supernode``, Flower's default). Used by ``tests/test_deploy.py``
and ``fedfuse bench deploy-round``; needs a source checkout (the FAB is built from it: :func:`check_checkout`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from common.config import unflatten
from common.data import synthetic
from common.offline import flower_environment

ROOT = Path(__file__).resolve().parents[1]  # the app: `flwr run ROOT` builds the FAB from it
BIN = Path(sys.executable).parent
CONNECTION = "local-tls"

# name -> modalities held (as in the issue: image+signal, signal, tabular+image)
DEFAULT_SITES: dict[str, tuple[str, ...]] = {
    "site-1": ("image", "signal"),
    "site-2": ("signal",),
    "site-3": ("tabular", "image"),
}
# Small and quick, same model as the default run config; tests override what they need.
BASE_RUN_CONFIG: dict[str, Any] = {
    "num-server-rounds": 2,
    "min-clients": 3,
    "round-timeout": 120.0,
    "federation.modalities": "image,signal,tabular",
    "federation.labels": ",".join(synthetic.LABELS),
    "dp.epsilon": 8.0,
}


def check_checkout() -> None:
    """Refuse clearly when fedfuse runs from an installed package: ``flwr run`` builds the app from the checkout."""
    if not (ROOT / "pyproject.toml").exists():
        from common.errors import ConfigError

        raise ConfigError(
            f"a local deployment needs a source checkout of fedfuse ({ROOT / 'pyproject.toml'} is missing): "
            "run it from the repository"
        )


class DeploymentError(RuntimeError):
    """A deployment process did not start, or a run did not end as expected."""


@dataclass
class Site:
    """One site: its data, state, policy and SuperNode process."""

    name: str
    modalities: tuple[str, ...]
    data_dir: Path
    state_dir: Path
    home: Path
    log_path: Path
    port: int
    max_epsilon: float
    max_delta: float | None = None
    proc: subprocess.Popen | None = None
    executor: subprocess.Popen | None = None  # `fedfuse site executor`, when started on its own (start_site_split)

    def num_train_examples(self) -> int:
        """The training-set size this site declares (as its IT would, from `fedfuse data validate`)."""
        import csv

        from common.data.site_folders import load_site
        from common.errors import DataError

        try:
            train = load_site(self.data_dir).part("train")
        except DataError:  # a folder broken on purpose (its start check refuses it): what its index says
            with open(Path(self.data_dir) / "index.csv", newline="") as f:
                return sum(row.get("split") == "train" for row in csv.DictReader(f))
        return len(train) if train is not None else 0

    def node_config(self) -> str:
        parts = [
            f'data-dir="{self.data_dir}"',
            f'state-dir="{self.state_dir}"',
            f'client-id="{self.name}"',
            f"max-epsilon={self.max_epsilon!r}",
            f"num-train-examples={self.num_train_examples()}",
        ]
        if self.max_delta is not None:
            parts.append(f"max-delta={self.max_delta!r}")
        return " ".join(parts)


@dataclass
class Run:
    """A finished run: Flower's view (status, details, ServerApp log) and fedfuse's run folder."""

    run_id: str
    status: str  # "finished:completed" | "finished:failed" | ...
    details: str
    folder: Path
    server_log: str
    seconds: float  # submission to end, as the operator sees it

    @property
    def results(self) -> dict[str, Any]:
        path = self.folder / "results.json"
        if not path.exists():
            raise DeploymentError(
                f"run {self.run_id} ({self.status}) wrote no results.json; ServerApp log:\n" + self.server_log[-4000:]
            )
        return json.loads(path.read_text())


class RunFailed(DeploymentError):
    """A run ended with a status other than the expected one."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_sites(folder: Path, sites: Mapping[str, Sequence[str]], *, samples: int = 240, seed: int = 7) -> dict[str, Path]:
    """Write one synthetic site folder per site, holding only its modalities (as ``fedfuse data synth``)."""
    from common.data.synthetic_sites import write_synthetic_sites

    return write_synthetic_sites(folder, {name: tuple(m) for name, m in sites.items()}, samples=samples, seed=seed)


def _signal_group(proc: subprocess.Popen | None, sig: int) -> None:
    if proc is None:
        return
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop(proc: subprocess.Popen | None, grace: float) -> None:
    """SIGTERM the process group, SIGKILL it after ``grace`` s; reap the leader."""
    if proc is None:
        return
    if proc.poll() is None and grace > 0:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(proc, signal.SIGKILL)  # children that outlive their leader too
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


class Deployment:
    """A SuperLink and its sites under one folder; see :func:`deployment`."""

    def __init__(
        self,
        root: Path,
        sites: Mapping[str, Sequence[str]],
        *,
        isolation: str = "warm",
        max_epsilon: float | Mapping[str, float] = 8.0,
        run_config: Mapping[str, Any] | None = None,
        samples: int = 240,
        superlink_env: Mapping[str, str] | None = None,
        site_options: Sequence[str] = (),
    ):
        if isolation not in ("warm", "subprocess"):
            raise ValueError(f"isolation must be 'warm' or 'subprocess', got {isolation!r}")
        self.root, self.isolation = root, isolation
        self.run_config = {**BASE_RUN_CONFIG, **(run_config or {})}
        self.superlink_env = dict(superlink_env or {})
        self.site_options = list(site_options)  # `fedfuse site supernode`'s own options (warm isolation)
        for sub in ("homes", "logs", "runs", "data", "state", "configs"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        from common.certs import make_credentials

        self.creds = make_credentials(root / "creds", server_names="127.0.0.1,localhost", sites=list(sites))
        data = write_sites(root / "data", sites, samples=samples)
        self.sites: dict[str, Site] = {}
        for name, modalities in sites.items():
            eps = max_epsilon[name] if isinstance(max_epsilon, Mapping) else max_epsilon
            self.sites[name] = Site(
                name,
                tuple(modalities),
                data[name],
                root / "state" / name,
                root / "homes" / name,
                root / "logs" / f"{name}.log",
                free_port(),
                float(eps),
            )
            # As the README says: the site's ledger key from `fedfuse certs` goes into its state folder
            self.sites[name].state_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self.creds.site(name).ledger_key, self.sites[name].state_dir / "ledger_key.pem")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.superlink: subprocess.Popen | None = None
        self.extra: list[subprocess.Popen] = []  # other processes started here (e.g. an unregistered node)
        self._runs = 0

    # --- processes -------------------------------------------------------------------------------
    def env(self, home: Path) -> dict[str, str]:
        """The environment of every Flower process: its own FLWR_HOME, nothing online, no dependency installs."""
        return (
            os.environ
            | flower_environment(home)
            | {
                "PYTHONUNBUFFERED": "1",
                "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            }
        )

    def _spawn(self, command: list[str], home: Path, log_path: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen:
        home.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(command)}\n".encode())
            log.flush()
            return subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env(home) | dict(env or {}),
                cwd=self.root,
                start_new_session=True,
            )

    def start_superlink(self, timeout: float = 90) -> None:
        """Start the SuperLink (TLS, --enable-supernode-auth, state in a database file) and wait until it serves."""
        c = self.creds
        command = [
            str(BIN / "flower-superlink"),
            "--ssl-ca-certfile",
            str(c.server_ca_cert),
            "--ssl-certfile",
            str(c.server_cert),
            "--ssl-keyfile",
            str(c.server_key),
            "--enable-supernode-auth",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--database",
            str(self.root / "superlink-state.db"),
            "--disable-runtime-dependency-installation",
        ]
        self.superlink = self._spawn(command, self.root / "homes" / "superlink", self.log_path("superlink"), self.superlink_env)
        self._wait_for_log("superlink", "Uvicorn running on", timeout, self.superlink)
        home = self.root / "homes" / "cli"
        home.mkdir(parents=True, exist_ok=True)
        connection = {"address": self.address, "root-certificates": str(c.server_ca_cert)}
        (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}}))

    def register(self, name: str) -> None:
        """Allow a site's public key at the SuperLink (``flwr supernode register``)."""
        self.flwr("supernode", "register", str(self.creds.site(name).auth_public_key), CONNECTION, "--name", name)

    def supernode_options(self, site: Site, *, key: Path | None = None) -> list[str]:
        """flower-supernode's options for a site (TLS + its private key + its node config)."""
        known = site.name in self.sites
        ca = self.creds.site(site.name).ca_cert if known else self.creds.ca_cert  # the same CA certificate
        return [
            "--superlink",
            self.address,
            "--root-certificates",
            str(ca),
            "--auth-supernode-private-key",
            str(key or self.creds.site(site.name).auth_private_key),
            "--node-config",
            site.node_config(),
            "--port",
            str(site.port),
            "--max-wait-time",
            "60",
        ]

    def site_command(self, site: Site, *, key: Path | None = None) -> list[str]:
        """The command that starts a site's SuperNode."""
        flower = self.supernode_options(site, key=key)
        if self.isolation == "warm":
            return [str(BIN / "fedfuse"), "site", "supernode", *self.site_options, "--", *flower]
        return [str(BIN / "flower-supernode"), *flower]

    def start_site(self, name: str, *, wait: bool = True, timeout: float = 120) -> None:
        """Start a site's SuperNode; with ``wait``, until it has joined (and its executor has preloaded)."""
        site = self.sites[name]
        if site.proc is not None and site.proc.poll() is None:
            raise DeploymentError(f"{name} is already running")
        site.state_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout
        while True:
            mark = self.log_size(name)
            site.proc = self._spawn(self.site_command(site), site.home, site.log_path)
            if not wait:
                return
            try:
                self._wait_for_log(name, "SuperNode ID", max(1.0, deadline - time.monotonic()), site.proc, after=mark)
                break
            except DeploymentError:
                # After a crash the SuperLink refuses the node until it has marked it offline (missed heartbeats)
                if "Failed to activate SuperNode" not in self.logs(name)[mark:] or time.monotonic() > deadline:
                    raise
                _stop(site.proc, grace=0)
                time.sleep(5)
        if self.isolation == "warm":
            self._wait_for_log(name, "preloaded", max(1.0, deadline - time.monotonic()), site.proc, after=mark)

    def start_site_split(self, name: str, *, timeout: float = 120) -> None:
        """Start a site as two processes, as an operator may run them under two services: ``flower-supernode
        --isolation process`` with a SuperExec secret, and ``fedfuse site executor`` beside it."""
        site = self.sites[name]
        if site.proc is not None and site.proc.poll() is None:
            raise DeploymentError(f"{name} is already running")
        secret = site.home / "superexec.secret"
        site.home.mkdir(parents=True, exist_ok=True)
        secret.write_bytes(os.urandom(32))
        secret.chmod(0o600)
        mark = self.log_size(name)
        site.proc = self._spawn(
            [
                str(BIN / "flower-supernode"),
                *self.supernode_options(site),
                "--isolation",
                "process",
                "--superexec-auth-secret-file",
                str(secret),
            ],
            site.home,
            site.log_path,
        )
        site.executor = self._spawn(
            [
                str(BIN / "fedfuse"),
                "site",
                "executor",
                "--runtime-api-address",
                f"127.0.0.1:{site.port}",
                "--superexec-auth-secret-file",
                str(secret),
            ],
            site.home,
            site.log_path,
        )
        self._wait_for_log(name, "SuperNode ID", timeout, site.proc, after=mark)
        self._wait_for_log(name, "preloaded", timeout, site.executor, after=mark)

    def kill_site(self, name: str) -> None:
        """SIGKILL a site's SuperNode, its executor and its running ClientApps (a crash, not a shutdown)."""
        _stop(self.sites[name].proc, grace=0)
        _stop(self.sites[name].executor, grace=0)

    def stop_site(self, name: str, grace: float = 15) -> None:
        """Stop a site gracefully (SIGTERM, then SIGKILL after ``grace`` s)."""
        _stop(self.sites[name].proc, grace)
        _stop(self.sites[name].executor, grace)

    def restart_site(self, name: str) -> None:
        """Stop a site and start it again with the same key, data, state folder and port."""
        self.stop_site(name)
        self.start_site(name)

    def start_unregistered(self, name: str, key: Path) -> subprocess.Popen:
        """Start a SuperNode whose key the SuperLink does not know (log: ``logs(name)``)."""
        return self.start_other(name, key)

    def start_other(self, name: str, key: Path, *, data_dir: Path | None = None) -> subprocess.Popen:
        """Start a SuperNode that is not one of the sites, with ``key`` and ``data_dir`` (default: the first site's data)."""
        base = next(iter(self.sites.values()))
        site = Site(
            name,
            base.modalities,
            data_dir or base.data_dir,
            self.root / "state" / name,
            self.root / "homes" / name,
            self.log_path(name),
            free_port(),
            8.0,
        )
        command = self.site_command(site, key=key)
        proc = self._spawn(command, site.home, site.log_path)
        self.extra.append(proc)
        return proc

    def close(self) -> None:
        """Stop every process this deployment started and make sure none is left."""
        procs = [s.proc for s in self.sites.values()] + [s.executor for s in self.sites.values()] + self.extra + [self.superlink]
        for proc in procs:  # everyone at once, then whoever is left after a few seconds gets SIGKILL
            if proc is not None and proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while any(p is not None and p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        for proc in procs:
            _stop(proc, grace=0)
        deadline = time.monotonic() + 10
        while (left := leftover_processes(self.root)) and time.monotonic() < deadline:
            for pid in left:  # a process that left its group (e.g. a ServerApp in its own session)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)

    # --- logs --------------------------------------------------------------------------------------
    def log_path(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def logs(self, name: str) -> str:
        """Everything a process (``superlink``, a site name, or ``run-<n>``) has written so far."""
        path = self.log_path(name)
        return path.read_text(errors="replace") if path.exists() else ""

    def log_size(self, name: str) -> int:
        path = self.log_path(name)
        return path.stat().st_size if path.exists() else 0

    def _wait_for_log(self, name: str, text: str, timeout: float, proc: subprocess.Popen | None, *, after: int = 0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.logs(name)[after:]:
                return
            if proc is not None and proc.poll() is not None:
                raise DeploymentError(
                    f"{name} exited with status {proc.returncode} before '{text}':\n" + self.logs(name)[after:][-3000:]
                )
            time.sleep(0.2)
        raise DeploymentError(f"{name}: no '{text}' in its log after {timeout:g} s:\n" + self.logs(name)[after:][-3000:])

    # --- the operator's side -----------------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI against this SuperLink (its own FLWR_HOME holds the connection)."""
        done = subprocess.run(
            [str(BIN / "flwr"), *args],
            env=self.env(self.root / "homes" / "cli"),
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and done.returncode != 0:
            raise DeploymentError(
                f"flwr {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
            )
        return done

    def nodes(self) -> list[dict[str, Any]]:
        """``flwr supernode ls --format json``: registered nodes and their status."""
        return json.loads(self.flwr("supernode", "ls", CONNECTION, "--format", "json").stdout)["nodes"]

    def submit(self, run_config: Mapping[str, Any] | None = None, *, app: Path = ROOT) -> tuple[str, Path]:
        """Submit a run of the app in this checkout, or in ``app`` (``flwr run``); return Flower's run id and the run folder."""
        self._runs += 1
        folder = self.root / "runs" / f"run-{self._runs}"
        config = {**self.run_config, **(run_config or {}), "out-dir": str(folder)}
        path = self.root / "configs" / f"run-{self._runs}.toml"
        path.write_text(tomli_w.dumps(unflatten(config)))
        done = self.flwr("run", str(app), CONNECTION, "--format", "json", "--run-config", str(path))
        try:
            return str(json.loads(done.stdout)["run-id"]), folder
        except (ValueError, KeyError) as exc:
            raise DeploymentError(f"flwr run printed no run id:\n{done.stdout[-2000:]}{done.stderr[-2000:]}") from exc

    def wait(self, run_id: str, folder: Path, *, timeout: float = 300, started: float | None = None) -> Run:
        """Block until the run ends (``flwr log --stream``), then read its status (``flwr ls``: `flwr run` cannot tell)."""
        started = time.monotonic() if started is None else started
        try:
            log = self.flwr("log", run_id, CONNECTION, "--stream", timeout=timeout, check=False)
            text = log.stdout + log.stderr
        except subprocess.TimeoutExpired as exc:
            self.flwr("stop", run_id, CONNECTION, check=False)
            raise DeploymentError(f"run {run_id} did not end within {timeout:g} s") from exc
        seconds = time.monotonic() - started
        (self.root / "logs" / f"run-{run_id}.log").write_text(text)
        run = json.loads(self.flwr("ls", CONNECTION, "--run-id", run_id, "--format", "json").stdout)["runs"][0]
        return Run(run_id, str(run.get("status", "")), str(run.get("status-details", "")), folder, text, seconds)

    def run(
        self,
        run_config: Mapping[str, Any] | None = None,
        *,
        timeout: float = 300,
        expect: str | None = "finished:completed",
        app: Path = ROOT,
    ) -> Run:
        """Submit a run and wait for it; raise RunFailed unless it ends with status ``expect`` (None: any)."""
        started = time.monotonic()
        run_id, folder = self.submit(run_config, app=app)
        run = self.wait(run_id, folder, timeout=timeout, started=started)
        if expect is not None and run.status != expect:
            raise RunFailed(
                f"run {run_id} ended {run.status!r} ({run.details}), expected {expect!r}; ServerApp log:\n"
                + run.server_log[-4000:]
            )
        return run


def _pids_with_env(marker: bytes) -> list[int]:
    """Processes of this user whose environment contains ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if marker in Path(f"/proc/{entry}/environ").read_bytes():
                found.append(int(entry))
        except OSError:
            pass
    return found


def leftover_processes(root: Path) -> list[int]:
    """Processes still running with an FLWR_HOME under ``root`` (should be none after a deployment closed)."""
    return _pids_with_env(f"FLWR_HOME={root / 'homes'}".encode())


@contextmanager
def deployment(
    root: Path,
    *,
    sites: Mapping[str, Sequence[str]] = DEFAULT_SITES,
    run_config: Mapping[str, Any] | None = None,
    isolation: str = "warm",
    max_epsilon: float | Mapping[str, float] = 8.0,
    samples: int = 240,
    superlink_env: Mapping[str, str] | None = None,
    site_options: Sequence[str] = (),
) -> Iterator[Deployment]:
    """A running deployment: SuperLink up, every site's key registered, every site joined; everything stopped on exit."""
    dep = Deployment(
        Path(root),
        sites,
        isolation=isolation,
        max_epsilon=max_epsilon,
        run_config=run_config,
        samples=samples,
        superlink_env=superlink_env,
        site_options=site_options,
    )
    try:
        dep.start_superlink()
        for name in dep.sites:
            dep.register(name)
        for name in dep.sites:
            dep.start_site(name, wait=False)
        for name in dep.sites:
            site = dep.sites[name]
            dep._wait_for_log(name, "SuperNode ID", 180, site.proc)
            if isolation == "warm":
                dep._wait_for_log(name, "preloaded", 180, site.proc)
        yield dep
    finally:
        dep.close()
