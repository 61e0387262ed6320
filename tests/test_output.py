"""What fedfuse prints: its own lines by default, other libraries' only with -v; a progress bar; short tables."""

from __future__ import annotations

import io
import logging
import warnings

import pytest
from rich.console import Console

from common.logs import setup_logging
from fedfuse.commands.simulate import MAX_CLIENT_ROWS, privacy_table
from fedfuse.progress import RoundProgress


@pytest.fixture
def restore_logging():
    """setup_logging reconfigures process-wide logging: put it back after the test."""
    root, fedfuse = logging.getLogger(), logging.getLogger("fedfuse")
    saved = root.handlers[:], root.level, fedfuse.level, fedfuse.propagate
    with warnings.catch_warnings():
        yield
    root.handlers[:], root.level = saved[0], saved[1]
    fedfuse.setLevel(saved[2])
    fedfuse.propagate = saved[3]


def emit_everything() -> list[str]:
    """Log what a simulation or a deployed site logs; the Python warnings that would be shown."""
    logging.getLogger("fedfuse.server").info("round 1/2 | accuracy 0.9")
    logging.getLogger("alembic.runtime.plugins").info("setup plugin alembic.autogenerate.schemas")
    logging.getLogger("httpx").info('HTTP Request: POST https://127.0.0.1:9094/ "HTTP/1.1 200 OK"')
    with warnings.catch_warnings(record=True) as shown:  # the filters in force, shown into a list
        warnings.warn_explicit("Tip: In future versions of Ray ...", FutureWarning, "worker.py", 1, module="ray._private.worker")
    return [str(w.message) for w in shown]


def test_by_default_only_fedfuse_lines_are_printed(restore_logging, capsys):
    setup_logging(flower=False)
    assert emit_everything() == []
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["INFO fedfuse.server: round 1/2 | accuracy 0.9"]


def test_verbose_brings_the_other_libraries_back(restore_logging, capsys):
    setup_logging(verbose=True, flower=False)
    assert emit_everything() == ["Tip: In future versions of Ray ..."]
    err = capsys.readouterr().err
    assert "alembic.autogenerate.schemas" in err and "HTTP Request" in err


def test_quiet_keeps_warnings_only(restore_logging, capsys):
    setup_logging(quiet=True, flower=False)
    emit_everything()
    logging.getLogger("fedfuse.server").warning("round 2: no update to aggregate")
    assert capsys.readouterr().err.splitlines() == ["WARNING fedfuse.server: round 2: no update to aggregate"]


def test_the_progress_bar_takes_the_round_lines_and_prints_the_others_above_it():
    # Prepare: a terminal console drawing into a buffer
    out = io.StringIO()
    handler = RoundProgress(10, Console(file=out, force_terminal=True, width=160))
    handler.progress.start()
    log = logging.getLogger("fedfuse.test-progress")
    log.propagate, log.handlers[:] = False, [handler]
    log.setLevel(logging.INFO)
    # Execute
    log.info("round %d/%d | accuracy %s", 3, 10, "0.812", extra={"progress": (3, 10)})
    log.warning("round 3: client-04 failed (timeout)")
    handler.progress.stop()
    # Assert: the bar stands at 3 of 10 with the round's figures; the warning is a line of its own
    task = handler.progress.tasks[0]
    assert (task.completed, task.total, task.fields["status"]) == (3, 10, "accuracy 0.812")
    text = out.getvalue()
    assert "3/10" in text and "WARNING fedfuse.test-progress: round 3: client-04 failed (timeout)" in text
    assert "round 3/10 | accuracy" not in text  # the round's line became the bar's status


def client(i: int, modalities: str, status: str = "active") -> dict:
    return {
        "modalities": modalities.split("+"),
        "rounds_trained": 10 - i % 3,
        "epsilon": 7.0 + (i % 100) / 100,
        "delta": 1e-5,
        "budget": 8.0,
        "status": status,
    }


def render(table) -> list[str]:
    out = io.StringIO()
    Console(file=out, width=120).print(table)
    return out.getvalue().splitlines()


def test_a_few_clients_get_a_row_each():
    clients = {f"client-{i:02d}": client(i, "image") for i in range(5)}
    lines = render(privacy_table(clients))
    assert sum("client-0" in line for line in lines) == 5


def test_a_thousand_clients_fit_on_a_screen():
    # Prepare: 1,000 clients in three groups, two of them excluded after their budget ran out
    clients = {f"client-{i:04d}": client(i, "image+signal" if i % 2 else "tabular") for i in range(998)}
    clients |= {f"client-{i:04d}": client(i, "image", "excluded: budget exhausted") for i in (998, 999)}
    # Execute
    lines = render(privacy_table(clients))
    # Assert: one row per group (largest first), the highest spend of each, and where every client's figures are
    assert len(clients) > MAX_CLIENT_ROWS and len(lines) < 15
    text = "\n".join(lines)
    assert "1000 clients" in text and "results.json" in text
    rows = [line for line in lines if "│" in line and "modalities" not in line]
    assert [r.split("│")[4].strip() for r in rows] == ["499", "499", "2"]
    assert "(ε = 7.99, δ = 1e-05)" in text and "8-10" in text
