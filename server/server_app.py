"""fedfuse ServerApp: sets up (or resumes) the run and lets the FedFuse strategy drive the rounds."""

import logging

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from common.config import parse_run_config, run_out_dir
from common.data.partition import federation_space, idle_sites, real_data_changes
from common.logs import flower_lines_once, log_to_stderr
from common.model.multimodal import global_head_template
from common.model.transforms import check_modalities, parse_transforms
from common.privacy.plan import drowning_warning
from server.grid import NodesUnavailableError, PollingGrid, quick_reply_pulls
from server.heldout import HeldoutEvaluator
from server.optimizer import build_optimizer
from server.run_folder import RunFolder
from server.secagg import run_secure
from server.strategy import FedFuse, RunState

log = logging.getLogger("fedfuse.server")
app = ServerApp()
flower_lines_once()  # under `flwr run` nothing else sets this process's logging up


def _show_progress() -> None:
    """A deployed ServerApp's stderr is the run's log (`flwr log`) and nothing configures logging there: show
    fedfuse's INFO lines. A library may have put a WARNING handler on the root logger at import (Opacus calls
    ``logging.basicConfig``), so the test is whether INFO would reach any handler, not whether one exists; a
    level set on fedfuse's logger is a choice made already (``fedfuse simulate --quiet``: warnings only)."""
    fedfuse = logging.getLogger("fedfuse")
    if fedfuse.handlers or fedfuse.level != logging.NOTSET or logging.getLogger().getEffectiveLevel() <= logging.INFO:
        return  # configured already (the fedfuse CLI, a simulation, the site's own set-up)
    log_to_stderr()


def _data_notes(config) -> dict:  # noqa: ANN001
    """Simulation: which sites take no part, what the knobs change in real data, and noise that drowns the signal."""
    if config.federation.modalities:  # a deployment: the server sees no data
        return {}
    notes: dict = {}
    if not config.data.synthetic:
        idle, changes = idle_sites(config), real_data_changes(config)
        for name, why in idle.items():
            log.warning("site '%s' takes no part in this run: %s", name, why)
        for change in changes:
            log.warning("the run alters the sites' real data: %s", change)
        notes = {"sites_not_training": idle, "data_changes": changes}
    if (warning := drowning_warning(config)) is not None:
        log.warning("%s", warning)
        notes["plan_warning"] = warning
    return notes


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or continue) the federated training described by the run config."""
    _show_progress()
    # Parse the run config once; open the output folder (resuming when it holds this run)
    config = parse_run_config(context.run_config)
    folder = RunFolder(run_out_dir(config, context.run_id))
    run_id = folder.open_run(config.to_flat())
    modalities, labels = federation_space(config)
    check_modalities(parse_transforms(config.model.transforms), modalities)
    optimizer = build_optimizer(config.server.strategy, config.server.server_lr)
    total = config.server.num_server_rounds

    # Start from the last checkpoint, or from a fresh head over every modality of the federation
    checkpoint = folder.load_checkpoint()
    if checkpoint is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.server.seed)
            head = global_head_template(modalities, len(labels), config.model)
        state = RunState(run_id, total, 0, head)
    else:
        rec = checkpoint.record
        state = RunState(
            run_id,
            total,
            checkpoint.round,
            checkpoint.global_state,
            rec["rounds"],
            rec["clients"],
            set(rec["excluded"]),
            checkpoint.ema_state,
        )
        optimizer.load_state(checkpoint.optimizer_state)
        log.info("resuming run %s after round %d of %d", run_id, checkpoint.round, total)

    heldout = HeldoutEvaluator(config) if config.data.server_test else None
    federation = {"modalities": list(modalities), "labels": list(labels)} | _data_notes(config)
    strategy = FedFuse(config, state, optimizer, folder, federation, heldout)
    if state.round_offset >= total:
        log.info("run %s already completed its %d rounds", run_id, total)
        folder.write_results(strategy.results(status="completed"))
        return
    rounds = total - state.round_offset
    log.info(
        "run %s: privacy: each site's own mechanisms in this run may spend at most ε = %g at δ = %g (dp.epsilon, "
        "composed over the run); each site's lifetime cap (max-epsilon, its whole history) applies as well, and "
        "each site's spend so far is logged at its first reply",
        run_id,
        config.dp.epsilon,
        config.dp.delta,
    )
    # replies polled every 0.2 s (Flower: 3 s), a missing reply is recorded as a failure; a deployment's log says
    # when each phase's replies arrived
    quick_reply_pulls()
    polling = PollingGrid(grid, timing_level=logging.INFO if config.federation.modalities else logging.DEBUG)
    strategy.node_names = polling.names  # the log names sites as registered, before their first reply
    try:
        if config.secagg.enabled:  # the head through SecAgg+: the server learns only the sum of the updates
            log.info("run %s: %d rounds with secure aggregation, output in %s", run_id, rounds, folder.path)
            run_secure(strategy, polling, context, num_rounds=rounds)
        else:
            log.info("run %s: %d rounds, output in %s", run_id, rounds, folder.path)
            polling.on_reply = strategy.reply_arrived  # each train reply checked as it arrives
            strategy.start(
                grid=polling,
                initial_arrays=ArrayRecord(state.global_state),
                num_rounds=rounds,
                timeout=config.server.round_timeout,
                evaluate_fn=strategy.end_round,
            )
    except NodesUnavailableError as exc:  # too few sites for longer than round-timeout: stop, say why
        log.error("run %s stopped: %s", run_id, exc)
        folder.write_results(strategy.results(status="failed") | {"error": str(exc)})
        raise
    folder.write_results(strategy.results(status="completed"))
