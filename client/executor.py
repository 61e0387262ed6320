"""A warm SuperExec for ``flower-supernode --isolation process``: ClientApps start in 0.2 s instead of 3-20 s.

Flower starts a fresh ``flwr-clientapp`` process (Python + Flower + torch + Opacus imports, ~7 s on
2 loaded cores) for every message a site receives. This executor imports those libraries once,
then for every ClientApp task it acquires from the SuperNode's Runtime API it ``fork()``s a child
that runs Flower's own ``run_clientapp`` with the task's token, exactly what
``flwr-clientapp --token T`` does. Each task still runs in its own process (a crash stays isolated)
and loads the ClientApp from the run's FAB: the parent forgets fedfuse's own modules after
preloading, so a child imports the app code that came with the run, not the site's installed copy.

Before Flower unpacks a task's FAB, the child checks it against the fedfuse installed at the site
(``common/provenance.py``): a run whose app code differs fails at once, before it can touch the data.

It relies on Flower internals (the Runtime API client and ``run_clientapp``), not a public API:
flwr is pinned to 1.42 in pyproject.toml and ``tests/test_deploy.py`` runs it end to end.
Fork safety: the parent starts no threads and runs no torch operations.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path

from common.errors import ConfigError, FedfuseError
from common.flower_pulls import quick_pulls
from common.logs import log_to_stderr
from common.provenance import ReviewedApp, UntrustedAppError

log = logging.getLogger("fedfuse.executor")

FLOWER_SERIES = "1.42."  # the Flower release whose internals this module uses
APP_PACKAGES = ("client", "common", "fedfuse", "server", "simulations")  # fedfuse's top-level packages (pyproject.toml)
# torch, Opacus, Flower and what a round imports lazily (torch._dynamo, from the optimiser: 2.5 s per task otherwise)
DEFAULT_PRELOAD = ("client.client_app", "common.data.site_folders", "torch._dynamo")
POLL_INTERVAL = 0.1  # seconds between task requests (flower-superexec: 1 s)
STOP_GRACE = 10.0  # seconds running ClientApps get to finish after SIGTERM


class ExecutorError(FedfuseError):
    """The warm executor cannot run (wrong Flower version, unreachable Runtime API)."""


class _Stop(BaseException):  # not an Exception: the loop's `except Exception` (and Flower's retries) must not swallow it
    """Raised by the SIGTERM / SIGINT handler to leave the task loop."""


def check_flower_version() -> None:
    """Refuse a Flower release whose internals this module was not written against."""
    found = version("flwr")
    if not found.startswith(FLOWER_SERIES):
        raise ExecutorError(
            f"the warm executor uses Flower {FLOWER_SERIES}x internals but flwr {found} is installed; install "
            f"flwr {FLOWER_SERIES}x (see constraints.txt) or use Flower's own executor (drop --isolation process)"
        )


def preload(modules: Sequence[str] = DEFAULT_PRELOAD) -> float:
    """Import ``modules`` (and so their libraries), then forget fedfuse's own modules; return the seconds taken."""
    started = time.perf_counter()
    for name in modules:
        importlib.import_module(name)
    forget_app_modules()
    return time.perf_counter() - started


def forget_app_modules(packages: Sequence[str] = APP_PACKAGES) -> list[str]:
    """Drop fedfuse's modules from ``sys.modules`` so that a ClientApp imports them from its FAB; return their names."""
    names = [m for m in sys.modules if m.split(".", 1)[0] in packages]
    for name in names:
        del sys.modules[name]
    return names


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


class WarmExecutor:
    """Acquire ClientApp tasks from a SuperNode's Runtime API and run each in a forked child."""

    def __init__(
        self,
        runtime_api_address: str,
        *,
        root_certificates: Path | None = None,
        auth_secret: bytes | None = None,
        poll: float = POLL_INTERVAL,
        reviewed: ReviewedApp | None = None,
    ):
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        check_flower_version()
        if root_certificates is None and not _is_loopback(runtime_api_address):
            raise ConfigError(
                f"the Runtime API at {runtime_api_address} would be reached without TLS; keep it on 127.0.0.1 "
                "(flower-supernode's default --host) or give the SuperNode --ssl-* files and this executor "
                "--root-certificates"
            )
        if not 0.01 <= poll <= 60:
            raise ConfigError(f"--poll must lie in [0.01, 60] seconds, got {poll}")
        self.address, self.poll = runtime_api_address, poll
        self.reviewed = reviewed or ReviewedApp.installed()  # fixed now: the code reviewed when the site started
        log.info("warm executor: runs only apps whose code is the fedfuse checkout at %s", self.reviewed.root)
        self.certificates = root_certificates.read_bytes() if root_certificates else None
        interceptors: list = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        if auth_secret:  # signs AcquireTask: only holders of the SuperNode's secret receive task tokens
            interceptors.append(
                SuperExecAuthHttpInterceptor(master_secret=auth_secret, protected_methods={"/flwr.proto.Runtime/AcquireTask"})
            )
        retry = make_simple_http_retry_invoker()
        retry.max_tries = 3  # then the task loop decides: wait for the SuperNode, or stop when it has gone
        self._client = RuntimeHttpClient.from_server_address(
            server_address=runtime_api_address,
            insecure=self.certificates is None,
            root_certificates=self.certificates,
            interceptors=interceptors,
            retry_invoker=retry,
        )
        self.children: set[int] = set()
        self.launched = 0

    def serve(self, keep_going: Callable[[], bool] = lambda: True) -> None:
        """Run tasks until SIGTERM / SIGINT or until ``keep_going()`` is false; then stop the running ClientApps."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        def stop(signum: int, _frame: object) -> None:
            raise _Stop(signal.Signals(signum).name)

        previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
        log.info("warm executor: taking ClientApp tasks from %s every %g s", self.address, self.poll)
        try:
            while keep_going():
                try:
                    res = self._client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value]))
                except Exception as exc:  # noqa: BLE001  (SuperNode not up yet, or gone: keep_going decides)
                    log.warning("warm executor: Runtime API at %s not reachable (%s); retrying", self.address, exc)
                    self.reap()
                    time.sleep(1.0)
                    continue
                if res.HasField("task") and res.token:
                    self._launch(res.token, acquired=time.monotonic())
                self.reap()
                time.sleep(self.poll)
        except _Stop as why:
            log.info("warm executor: %s received, stopping", why)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.shutdown()

    def _launch(self, token: str, *, acquired: float | None = None) -> None:
        """Fork a child that runs one ClientApp task (``acquired``: when the task was taken, for its timing line)."""
        self.launched += 1
        pid = os.fork()
        if pid == 0:  # child: never returns
            _run_task(self.address, token, self.certificates, self.reviewed, TaskTimer(self.launched, acquired))
        self.children.add(pid)
        log.debug("warm executor: task %d runs in process %d", self.launched, pid)

    def reap(self) -> None:
        """Collect finished children (no zombies)."""
        for pid in list(self.children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                self.children.discard(pid)
                code = os.waitstatus_to_exitcode(status)
                if code != 0:
                    log.warning("warm executor: ClientApp process %d ended with status %d", pid, code)

    def shutdown(self, grace: float = STOP_GRACE) -> None:
        """Ask running ClientApps to stop (SIGTERM), kill what is left after ``grace`` s."""
        for pid in self.children:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.children and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.05)
        for pid in self.children:
            _signal(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        self.children.clear()
        self._client.close()


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


class TaskTimer:
    """Where one task's time goes, logged as one line in the site's log when the task ends.

    Marks: the task was acquired from the SuperNode, its input (message, context, app bundle) was pulled, the
    bundle was checked and installed, the ClientApp's reply started and finished going back to the SuperNode.
    """

    STEPS = (("input", "acquired", "pulled"), ("app", "pulled", "installed"), ("handler", "installed", "pushing"))

    def __init__(self, task: int, acquired: float | None = None):
        self.task = task
        self.marks: dict[str, float] = {"acquired": acquired if acquired is not None else time.monotonic()}

    def mark(self, name: str) -> None:
        self.marks[name] = time.monotonic()

    def timed(self, fn: Callable, before: str | None, after: str) -> Callable:
        """``fn``, marking ``before`` as it starts and ``after`` as it returns."""

        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202  (any signature)
            if before:
                self.mark(before)
            result = fn(*args, **kwargs)
            self.mark(after)
            return result

        return wrapper

    def line(self) -> str:
        """``task 3: 1.42 s (input 0.21 s, app 0.05 s, handler 0.98 s, reply 0.18 s), ended 20:01:02.345``."""
        m, end = self.marks, time.monotonic()
        parts = [f"{name} {m[a] - m[b]:.2f} s" for name, b, a in self.STEPS if b in m and a in m]
        if "pushing" in m:
            parts.append(f"reply {m.get('pushed', end) - m['pushing']:.2f} s")
        ended = time.strftime("%H:%M:%S", time.localtime()) + f".{int(time.time() * 1000) % 1000:03d}"
        return f"task {self.task}: {end - m['acquired']:.2f} s ({', '.join(parts)}), ended {ended}"


def _check_apps_before_install(reviewed: ReviewedApp) -> None:
    """Make Flower's ClientApp runner refuse (before unpacking it) a FAB whose code is not the reviewed one."""
    from flwr.supernode.runtime import run_clientapp as runner

    install = runner.install_from_fab

    def checked_install(fab_file, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202  (Flower's signature)
        if not isinstance(fab_file, bytes):
            raise UntrustedAppError("the app bundle did not arrive as bytes; it cannot be checked")
        try:
            reviewed.check(fab_file)
        except UntrustedAppError as exc:
            logging.getLogger("fedfuse.executor").error("refused the run's app: %s", exc)
            raise
        return install(fab_file, *args, **kwargs)

    runner.install_from_fab = checked_install


def _time_steps(timer: TaskTimer) -> None:
    """Mark the steps of Flower's ClientApp runner on ``timer`` (after the bundle check is in place)."""
    from flwr.supernode.runtime import run_clientapp as runner

    # The task is handed out before the SuperNode has the message's objects: retry them after 0.05 s, not 1 s
    quick_pulls(runner, "pull_and_inflate_object_from_tree")
    runner.pull_task_input = timer.timed(runner.pull_task_input, None, "pulled")
    runner.install_from_fab = timer.timed(runner.install_from_fab, None, "installed")
    runner.push_message = timer.timed(runner.push_message, "pushing", "pushed")


def _run_task(
    address: str, token: str, certificates: bytes | None, reviewed: ReviewedApp, timer: TaskTimer | None = None
) -> None:
    """In the forked child: run one task as ``flwr-clientapp --token`` would, then exit with its status."""
    code = 1
    timer = timer or TaskTimer(0)
    try:
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_DFL)  # run_clientapp installs Flower's own handlers
        log_to_stderr()  # fedfuse's messages (e.g. a policy refusal) in the site's log
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        _check_apps_before_install(reviewed)
        _time_steps(timer)
        run_clientapp(
            runtime_api_address=address,
            token=token,
            insecure=certificates is None,
            certificates=certificates,
            parent_pid=os.getppid(),
            runtime_dependency_install=False,
        )
        code = 0
    except SystemExit as exc:  # run_clientapp ends with flwr_exit -> sys.exit(code)
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001  (never let a child return into the parent's loop)
        logging.getLogger("fedfuse.executor").exception("ClientApp task failed")
    finally:
        logging.getLogger("fedfuse.executor").info("%s", timer.line())
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
