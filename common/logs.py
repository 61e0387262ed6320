"""fedfuse's logging set-up: its own progress lines on the ``fedfuse`` logger, Flower's chatter down to warnings."""

from __future__ import annotations

import logging


def setup_logging(quiet: bool) -> None:
    """Flower's own per-round logging down to warnings; fedfuse's progress lines (warnings only when ``quiet``)."""
    import flwr.supercore.logger  # noqa: F401  (configures the "flwr" logger on import)

    flwr_log = logging.getLogger("flwr")
    flwr_log.setLevel(logging.WARNING)  # Flower's own per-round chatter; our progress lines replace it
    flwr_log.propagate = False  # it has its own console handler
    logging.getLogger("fedfuse").setLevel(logging.WARNING if quiet else logging.INFO)
