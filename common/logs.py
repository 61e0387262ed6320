"""fedfuse's logging set-up, the one place it is done: fedfuse's own lines, third-party noise only with ``-v``.

By default the root logger passes warnings only, so the INFO lines of other libraries (Flower's database
migrations through alembic, httpx's one line per request of a polling site) stay out of the way; fedfuse's
logger keeps INFO. ``-v`` brings everything back (fedfuse at DEBUG, the rest at INFO).
"""

from __future__ import annotations

import logging
import sys
import warnings

FORMAT = "%(levelname)s %(name)s: %(message)s"
# Python warnings of libraries that say nothing about the user's run (shown with -v).
LIBRARY_WARNINGS = (
    (FutureWarning, r"ray(\.|$)"),  # "Tip: In future versions of Ray, Ray will no longer override accelerator ..."
)


def setup_logging(quiet: bool = False, *, verbose: bool = False, flower: bool = True) -> None:
    """Set up logging for a fedfuse command: fedfuse at INFO (WARNING when ``quiet``, DEBUG when ``verbose``).

    ``flower``: also quiet Flower's own logger (it imports Flower, so commands that do not run Flower say False).
    """
    # force: an imported library may already have put a handler on the root logger (Opacus calls basicConfig).
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format=FORMAT, force=True)
    logging.getLogger("fedfuse").setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    if not verbose:
        for category, module in LIBRARY_WARNINGS:
            warnings.filterwarnings("ignore", category=category, module=module)
    if flower:
        setup_flower_logging(verbose=verbose)


def setup_flower_logging(*, verbose: bool = False) -> None:
    """Flower's logger: through its own handler only (the root's would print each line twice), warnings unless ``verbose``.

    Flower's per-round INFO lines are replaced by fedfuse's progress; Flower sets its level when first imported,
    so this imports it first.
    """
    import flwr.supercore.logger  # noqa: F401  (configures the "flwr" logger on import)

    logging.getLogger("flwr").setLevel(logging.DEBUG if verbose else logging.WARNING)
    flower_lines_once()


def flower_lines_once() -> None:
    """Flower's lines through Flower's own handler only.

    Passed on to the root logger as well, each would print twice: Opacus puts a timestamped handler on the
    root when imported (a deployed ServerApp under `flwr run`, a simulated client's Ray worker).
    """
    logging.getLogger("flwr").propagate = False


def flower_worker_level(verbose: bool) -> str:
    """``FLWR_LOG_LEVEL`` for processes Flower starts (Ray's simulated clients): errors only unless ``verbose``.

    Their warnings are Flower's bookkeeping ("Manually terminating ClientAppActor" for every client at the end);
    fedfuse's own client warnings go through fedfuse's logger and still show.
    """
    return "INFO" if verbose else "ERROR"


def log_to_stderr(level: int = logging.INFO) -> None:
    """In a process nothing else configures (a deployed ServerApp, a site's task): fedfuse's lines on stderr, once."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    fedfuse = logging.getLogger("fedfuse")
    fedfuse.handlers[:] = [handler]
    fedfuse.setLevel(level)
    fedfuse.propagate = False  # the root's handler, if a library added one, would print each line twice
