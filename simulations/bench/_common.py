"""Shared pieces of the real-data benchmarks: data import into a cache, one simulation per cell, tables, hardware."""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import ConfigError, FedfuseError

log = logging.getLogger("fedfuse.bench")

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"


@dataclass(frozen=True)
class Cell:
    """One simulation of a benchmark: a name (its folder), the seed, and its run-config overrides."""

    name: str
    seed: int
    overrides: dict[str, Any]


def add_common_arguments(parser: Any, *, scenario: str) -> None:
    """The options every real-data benchmark takes."""
    parser.add_argument(
        "--data", type=Path, required=True, help="the shared data root (with the dataset's folders) or the dataset's own folder"
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output folder: imported data cache, one run folder per simulation, results JSON + table",
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds per setting (default 3; mean and std over them)")
    parser.add_argument(
        "--scenario",
        type=Path,
        default=SCENARIOS / scenario,
        help=f"scenario TOML with the tuned hyperparameters (default simulations/scenarios/{scenario})",
    )
    parser.add_argument("--rounds", type=int, help="override num-server-rounds of the scenario (e.g. a quick look)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one run-config key for every simulation (repeatable)",
    )


def epsilon_list(text: str) -> list[float]:
    """``"inf,1,3,8"`` -> ``[inf, 1.0, 3.0, 8.0]``; ConfigError on anything else."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"expected comma-separated numbers (inf for non-private), got '{text}'") from None
    if not values or any(math.isnan(v) or v <= 0 for v in values):
        raise ConfigError(f"expected positive numbers (inf for non-private), got '{text}'")
    return values


def fmt_eps(epsilon: float) -> str:
    """``inf`` -> ``∞``, 8.0 -> ``8``."""
    return "∞" if math.isinf(epsilon) else f"{epsilon:g}"


def eps_tag(epsilon: float) -> str:
    """A budget in a folder name: ``inf`` or ``8``."""
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


def run_cells(
    cells: Sequence[Cell],
    *,
    scenario: Path,
    common: list[str],
    rounds: int | None,
    runs_dir: Path,
    progress: Callable[[str], None] = print,
) -> dict[str, dict[str, Any]]:
    """Run each cell as one in-process Flower simulation (reusing a completed run folder); name -> results.json."""
    from common.config import parse_run_config
    from common.data.partition import num_clients
    from common.fileio import atomic_write_json
    from server.run_folder import RUN_FILE, config_differences
    from simulations import runner
    from simulations.scenario import build_config

    out: dict[str, dict[str, Any]] = {}
    for i, cell in enumerate(cells, 1):
        folder = (runs_dir / cell.name).resolve()
        results_path = folder / "results.json"
        sets = list(common) + [f"{k}={_toml(v)}" for k, v in cell.overrides.items()] + [f"seed={cell.seed}"]
        if rounds is not None:
            sets.append(f"num-server-rounds={rounds}")
        flat = build_config(scenario, sets)
        flat["out-dir"] = str(folder)
        if results_path.exists():
            done = json.loads(results_path.read_text())
            if done.get("status") == "completed" and not config_differences(done.get("config", {}), flat):
                progress(f"[{i}/{len(cells)}] {cell.name}: reusing the completed run in {folder}")
                if not (folder / REPORT_FILE).exists():  # a run from before fedfuse wrote reports
                    _write_report(folder)
                out[cell.name] = done
                continue
        # A folder with an interrupted run of this configuration is resumed; another configuration is refused.
        run_file = folder / RUN_FILE
        if run_file.exists() and (differences := config_differences(json.loads(run_file.read_text()).get("config", {}), flat)):
            raise ConfigError(
                f"{folder} holds a run with another configuration ({'; '.join(differences)}); delete it or choose another --out"
            )
        clients = num_clients(parse_run_config(flat))
        progress(f"[{i}/{len(cells)}] {cell.name}: {clients} clients, {flat['num-server-rounds']} rounds ...")
        start = time.perf_counter()
        runner.run(flat, num_clients=clients, out_dir=folder)
        if not results_path.exists():
            raise FedfuseError(f"the simulation {cell.name} wrote no results.json; see the log above")
        done = json.loads(results_path.read_text())
        done["bench_seconds"] = round(time.perf_counter() - start, 1)
        atomic_write_json(results_path, done)  # results.json as the server wrote it, plus the bench's timing
        if done.get("status") != "completed":
            raise FedfuseError(
                f"the simulation {cell.name} did not complete (status {done.get('status')}); see {folder}; run the same command again to resume it"
            )
        _write_report(folder)
        progress(f"    done in {done['bench_seconds']:.0f} s")
        out[cell.name] = done
    return out


REPORT_FILE = "report.html"  # common.insight.report.REPORT_FILE, named here so that light benchmarks skip matplotlib


def _write_report(folder: Path) -> None:
    """The run's HTML report beside its results (a failure is logged, never fatal to the benchmark)."""
    from common.insight.report import write_report

    try:
        write_report(folder)
    except Exception as exc:  # noqa: BLE001  (the figures are in results.json; the page can be redrawn)
        log.warning("could not write the report of %s (%s); redraw it with: fedfuse report %s", folder, exc, folder)


def _toml(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return str(value).lower() if isinstance(value, bool) else str(value)


def epsilon_ok(results: dict[str, Any]) -> bool:
    """Every client's final epsilon is within its budget (non-private runs: trivially)."""
    for c in results["privacy"]["clients"].values():
        eps, budget = c.get("epsilon"), c.get("budget")
        if eps is not None and budget is not None and eps > budget + 1e-9:
            return False
    return True


def max_epsilon(results: dict[str, Any]) -> float:
    """The largest final epsilon over the clients (inf when non-private)."""
    values = [c.get("epsilon") for c in results["privacy"]["clients"].values()]
    return max((math.inf if v is None else float(v)) for v in values) if values else math.nan


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    if any(math.isinf(v) for v in vals):  # e.g. the epsilon of non-private runs
        return (vals[0], 0.0) if all(v == vals[0] for v in vals) else (math.inf, math.nan)
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def pm(values: Sequence[float], scale: float = 100.0) -> str:
    """``mean ± std`` in percent points, one decimal."""
    m, s = mean_std(values)
    return "-" if math.isnan(m) else f"{m * scale:.1f} ± {s * scale:.1f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def hardware() -> dict[str, Any]:
    """The machine and software the figures came from."""
    import flwr
    import opacus
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    return {
        "cpu": cpu,
        "cores": cores,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "gpu": "none used (CPU simulation)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flwr": flwr.__version__ if hasattr(flwr, "__version__") else "?",
        "opacus": opacus.__version__,
        "os": platform.platform(),
    }


def command_line() -> str:
    """The command that is running, as typed (``fedfuse bench ...``)."""
    argv = list(sys.argv)
    argv[0] = Path(argv[0]).name
    return shlex.join(argv)


def write_outputs(out: Path, stem: str, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """``<out>/<stem>.json`` and ``<out>/<stem>.md``; returns their paths."""
    from common.fileio import atomic_write_json

    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    atomic_write_json(json_path, _json_safe(payload))
    md_path.write_text(markdown + "\n")
    return json_path, md_path


def finish(
    out: Path, name: str, title: str, *, started: float, runs: dict[str, dict[str, Any]], body: str, payload: dict[str, Any]
) -> int:
    """Write ``<out>/<name>-results.{json,md}``, print the tables; exit status 1 if any client overspent."""
    hw = hardware()
    payload = {
        "benchmark": name,
        "command": command_line(),
        "hardware": hw,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "reports": {run: f"runs/{run}/{REPORT_FILE}" for run in runs},
        **payload,
    }  # relative to <out>
    json_path, md_path = write_outputs(out, f"{name}-results", payload, header(title, started, hw, runs) + body)
    print(body)
    print(f"\nwall time {(time.perf_counter() - started) / 60:.1f} min; results: {json_path}, {md_path}")
    bad = [n for n, r in payload.get("runs", {}).items() if not r["epsilon_ok"]]
    if bad:
        print(f"clients spent more than their budget in: {', '.join(bad)}")
        return 1
    return 0


def _json_safe(value: Any) -> Any:
    """Like common.fileio.json_safe, but a benchmark report keeps ±inf as "inf" (a non-private budget), NaN as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def header(title: str, started: float, hw: dict[str, Any], runs: dict[str, dict[str, Any]]) -> str:
    """The markdown preamble: what, when, the command, the machine, the wall time and the simulations' time."""
    simulated = sum(r.get("bench_seconds") or 0.0 for r in runs.values())
    return "\n".join(
        [
            f"# {title}",
            "",
            f"- command: `{command_line()}`",
            f"- finished: {datetime.datetime.now().isoformat(timespec='seconds')}, wall time {(time.perf_counter() - started) / 60:.1f} min "
            f"(the {len(runs)} simulations took {simulated / 60:.1f} min when they ran; completed runs are reused)",
            f"- machine: {hw['cpu']}, {hw['cores']} cores (load average at the end {hw['load_average']}), {hw['gpu']}; "
            f"python {hw['python']}, torch {hw['torch']}, flwr {hw['flwr']}, opacus {hw['opacus']}",
            "- run reports (scores, modality contributions, privacy): "
            + ", ".join(f"[{name}](runs/{name}/{REPORT_FILE})" for name in runs),
            "",
            "",
        ]
    )


def run_benchmark(
    args: Any,
    *,
    name: str,
    label: str,
    title: str,
    importer: Callable[[Path, Path], Path],
    cells: Callable[[Path], list[Cell]],
    report: Callable[[dict[str, dict[str, Any]], list[Cell], Path, Path], tuple[str, dict[str, Any]]],
) -> int:
    """A real-data benchmark from start to end: import the data into ``<out>/cache/<name>`` (once), run its
    cells (reusing finished runs), then ``report(runs, cells, cache, runs_dir) -> (body, payload fields)``."""
    from common.logs import setup_logging

    started = time.perf_counter()
    setup_logging(quiet=True)  # the bench prints its own progress
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cache = importer(args.data.resolve(), out / "cache" / name)
    todo = cells(cache)
    common = ["data.dataset=" + _toml(str(cache)), *args.overrides]
    print(f"{label} benchmark: {len(todo)} simulations ({args.seeds} seed(s)); runs in {out / 'runs'}", flush=True)
    runs = run_cells(
        todo,
        scenario=args.scenario,
        common=common,
        rounds=args.rounds,
        runs_dir=out / "runs",
        progress=lambda s: print(s, flush=True),
    )
    body, fields = report(runs, todo, cache, out / "runs")
    return finish(
        out,
        name,
        title,
        started=started,
        runs=runs,
        body=body,
        payload={"scenario": str(args.scenario), "overrides": common, **fields},
    )
