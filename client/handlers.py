"""What a client does with a train or evaluate message. Encoders, raw data and per-sample values never
leave this module: a train reply carries the head blocks (plus encoders only when the federation
runs with ``encoders = "federated"``), the privacy spend and the signed ledger entry."""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.model_cache import ModelCache
from client.site import SiteContext, resolve_site
from client.state import MODEL_FILE, ClientRecord, ClientState
from common import messages as M
from common.config import RunConfig, parse_run_config
from common.errors import BudgetExhaustedError, EncoderError, NonFiniteError
from common.insight.attention import attention_metrics
from common.messages import update_digest
from common.model.evaluation import evaluate
from common.model.multimodal import ENCODER_PREFIX, HEAD_PREFIX, MultimodalModel, check_global_parameters
from common.model.validation import check_model_encoders, site_refusal
from common.model.warm_start import warm_start
from common.privacy.ledger import KEY_FILE, LEDGER_FILE, Ledger, LedgerKey, encode_entry, entry_fields, utc_now
from common.privacy.training import DPRequest, RoundResult, local_training, sampling_plan, train_round

log = logging.getLogger("fedfuse.client")
MODELS = ModelCache()  # each site's last trained model in this process (client/model_cache.py)


def _non_private_key(seed: int, client_id: str, server_round: int) -> int:
    """Key of a non-private round's shuffling and modality dropout, from the run's seed: such a round keeps
    nothing private, so its runs may be reproducible. A DP round never uses it (its key is secret)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{client_id}/{server_round}".encode()).digest()[:8], "big")


# The reply to a round whose noised parameters became non-finite: fixed text, nothing computed from the data.
DISCARDED_REASON = (
    "the round's noised update was not finite (try a lower train.lr); it was discarded and its privacy cost is charged"
)


def _model(site: SiteContext, config: RunConfig, state: ClientState, *, cached: bool = False) -> MultimodalModel:
    """The client's model, restored from its state folder (fresh, seeded weights on first use, warm-started
    from ``model.init.<modality>`` files). The run's encoders are checked first, on synthetic inputs
    (EncoderError says why one is refused). ``cached``: the model this process trained last round for this site,
    taken out of :data:`MODELS` while its file is unchanged (a training round puts it back once saved)."""
    check_model_encoders(
        site.train.schema.modalities, config.model.encoders, config.model.embed_dim, config.train.grad_sample_mode
    )
    if cached and (model := MODELS.take(state.folder, state.folder / MODEL_FILE, _built_as(site, config))) is not None:
        return model
    model = MultimodalModel(site.train.schema, config.model, seed=_seed(site, config))
    stored = state.load_model()
    if stored is not None:
        model.load_state_dict(stored)
    else:
        warm_start(model.encoders, config.model.inits)  # public weights: no privacy cost
    return model


def _seed(site: SiteContext, config: RunConfig) -> int:
    """Federated encoders must start from one initialisation per modality; local ones may differ per site."""
    return config.server.seed if config.server.encoders == "federated" else config.server.seed * 1000 + site.index + 1


def _built_as(site: SiteContext, config: RunConfig) -> tuple:
    """What a site's model is built from (a cached model built from anything else is not used)."""
    return (site.client_id, site.train.schema, config.model, _seed(site, config))


def _encoder_refusal(message: Message, context: Context, config: RunConfig) -> Message | None:
    """A deployed site's refusal of encoder factories its node config does not allow: decided from the run and
    node configs alone, before the site's data is loaded or any of the factory's code is imported."""
    if "partition-id" in context.node_config:  # simulation: the researcher's own sites
        return None
    reason = site_refusal(config.model.encoders, context.node_config)
    if reason is None:
        return None
    node = context.node_config
    client_id = str(node.get("client-id") or Path(str(node.get("data-dir", ""))).name)
    log.warning("%s: %s", client_id, reason)
    record = {M.CLIENT_ID: client_id, M.MODALITIES: [], M.STATUS: M.STATUS_POLICY_REFUSED, M.REASON: reason}
    content = RecordDict({M.METRICS: MetricRecord({M.NUM_EXAMPLES: 0}), M.CLIENT: ConfigRecord(record)})
    return Message(content, reply_to=message)


def _shared_keys(model: MultimodalModel, config: RunConfig) -> list[str]:
    """The parameter names this client shares with the federation."""
    keys = [k for k in model.state_dict() if k.startswith(HEAD_PREFIX)]
    if config.server.encoders == "federated":
        keys += [k for k in model.state_dict() if k.startswith(ENCODER_PREFIX)]
    return keys


def _merge_global(model: MultimodalModel, message: Message, keys: list[str]) -> dict[str, torch.Tensor]:
    """Check the server's parameters, load the global values of this client's shared blocks; return them."""
    received = M.unpack_arrays(message.content)
    check_global_parameters(model, received, keys)  # before any data is touched
    wanted = set(keys)
    merged = {k: v for k, v in received.items() if k in wanted}
    model.load_partial(merged)
    return merged


def _identity(
    site: SiteContext, status: str, reason: str = "", ledger: list[dict] | None = None, request: ConfigRecord | None = None
) -> ConfigRecord:
    record = {M.CLIENT_ID: site.client_id, M.MODALITIES: list(site.modalities), M.STATUS: status, M.REASON: reason}
    if ledger is not None:  # the entries the server's copy lacks: it appends them after checking they continue it
        # from the last entry the server holds on (it checks that entry is its copy's last), or the whole ledger
        record[M.LEDGER] = [encode_entry(e) for e in ledger[max(_server_holds(ledger, request) - 1, 0) :]]
    return ConfigRecord(record)


def _server_holds(ledger: list[dict], request: ConfigRecord | None) -> int:
    """How many leading entries of ``ledger`` the federation's copy holds, as the request says (0 if it does not
    say, or if what it says is not this ledger's beginning: then the whole ledger goes, and the server decides)."""
    if request is None:
        return 0
    held, head = request.get(M.LEDGER_HELD), request.get(M.LEDGER_HEAD)
    if not isinstance(held, int) or not 0 < held <= len(ledger) or ledger[held - 1].get("entry_hash") != head:
        return 0
    return held


def _ledger_entries(path: Path) -> list[dict] | None:
    """The client's whole verified ledger, or None when it has none."""
    ledger = Ledger(path)
    return ledger.entries() if ledger.path.exists() else None


def _status_reply(
    message: Message, site: SiteContext, status: str, reason: str, metrics: dict, ledger: list[dict] | None = None
) -> Message:
    log.warning("%s: %s", site.client_id, reason)
    request = message.content.config_records.get(M.CONFIG)
    content = RecordDict({M.METRICS: MetricRecord(metrics), M.CLIENT: _identity(site, status, reason, ledger, request)})
    return Message(content, reply_to=message)


def _budgets(site: SiteContext, config: RunConfig) -> tuple[float, float, str | None]:
    """(the run's allowance, the site's lifetime cap), or a refusal when the run asks for more than the site allows.

    Simulation: both are the scenario's budget for this client. Deployment: the run's ``dp.epsilon`` (what this
    run's own mechanisms may spend) and the site's ``max-epsilon`` (what its whole history may spend).
    """
    if site.simulated:
        return site.max_epsilon, site.max_epsilon, None
    if config.dp.epsilon > site.max_epsilon:
        return (
            math.nan,
            math.nan,
            (
                f"the run asks for a budget of ε = {config.dp.epsilon:g} but this site's policy allows at most "
                f"ε = {site.max_epsilon:g}; lower dp.epsilon in the run config"
            ),
        )
    if site.max_delta is not None and config.dp.delta > site.max_delta:
        return (
            math.nan,
            math.nan,
            (f"the run asks for δ = {config.dp.delta:g} but this site's policy allows at most δ = {site.max_delta:g}"),
        )
    return config.dp.epsilon, site.max_epsilon, None


def _entry_fields(
    site: SiteContext,
    config: RunConfig,
    *,
    run_id: str,
    server_round: int,
    status: str,
    result: RoundResult | None,
    epsilon: float,
    budget: float,
    update_hash: str | None,
    record: ClientRecord,
    run_epsilon: float,
    run_budget: float,
) -> dict:
    """The unsigned ledger entry of a round (its time fixed now, so a recovered entry is the same entry).

    ``epsilon`` / ``budget``: lifetime epsilon and the site's cap; ``run_epsilon`` / ``run_budget``: this
    run's own epsilon and its allowance."""
    history = record.history
    if result is not None:  # trained, privately or not: its real steps
        sigma, q, steps = result.noise_multiplier or 0.0, result.sample_rate, result.steps
    elif status == "discarded":  # the round failed after using the data: its mechanism is the last in the history
        sigma, q, steps = history.entries[-1]
    else:  # refused: nothing trained; the noise planned for this run if any, the public sampling rate
        q, _ = sampling_plan(site.declared_examples, config.train.batch_size, config.train.local_epochs)
        planned = history.plan is not None and history.plan.run_id == run_id
        sigma, steps = (history.plan.noise_multiplier if planned else 0.0), 0
    return entry_fields(
        run_id=run_id,
        client_id=site.client_id,
        round=server_round,
        status=status,
        noise_multiplier=sigma,
        sample_rate=q,
        steps=steps,
        max_grad_norm=config.dp.max_grad_norm,
        delta=config.dp.delta,
        accountant=history.accountant,
        epsilon=epsilon,
        budget=budget,
        run_epsilon=run_epsilon,
        run_budget=run_budget,
        update_hash=update_hash,
        modalities=site.modalities,
    ) | {"time": utc_now()}


def _run_epsilon(record: ClientRecord, run_id: str) -> float:
    """This run's own epsilon so far (0 when the client has not been charged in this run)."""
    return record.history.run_epsilon(run_id)


def _sign(state: ClientState, ledger: Ledger, fields: dict) -> list[dict]:
    """Append ``fields`` to the client's own ledger, signed with its key; return the whole chain.

    ``ledger`` was verified at the start of the round (:func:`handle_train`): the append checks only the new
    entry against it, unless the file changed since."""
    ledger.append(fields, LedgerKey.load_or_create(state.folder / KEY_FILE))
    return ledger.chain or []


def _charge(state: ClientState, ledger: Ledger, record: ClientRecord, fields: dict) -> list[dict]:
    """Record a round's privacy spend, then its ledger entry.

    The entry is saved with the accountant history in one atomic write (as ``record.pending``) before
    it is signed into the ledger, so a crash between the two cannot leave a spend the ledger lacks:
    :func:`_settle` signs the pending entry on the next start.
    """
    record.pending = fields
    state.save_record(record)
    return _sign(state, ledger, fields)


def _settle(state: ClientState, ledger: Ledger, record: ClientRecord, client_id: str) -> None:
    """Sign the last charged round's entry if a crash kept it out of the ledger."""
    pending = record.pending
    if not pending:
        return
    key = (pending["run_id"], pending["round"], pending["time"])
    entries = ledger.entries()
    if any(isinstance(e, dict) and (e.get("run_id"), e.get("round"), e.get("time")) == key for e in entries):
        return
    log.warning(
        "%s: round %s of run %s was charged to the privacy history but its ledger entry was not written "
        "(a crash); signing it now",
        client_id,
        pending["round"],
        pending["run_id"],
    )
    _sign(state, ledger, pending)


def handle_train(message: Message, context: Context, *, admit: Callable[[SiteContext], None] | None = None) -> Message:
    """Merge the global head, train encoders + head with DP-SGD, reply with the shared blocks only."""
    config = parse_run_config(context.run_config)
    refused = _encoder_refusal(message, context, config)
    if refused is not None:
        return refused
    site = resolve_site(context.node_config, config, context.run_id)
    if admit is not None:  # a caller's own limits (secure aggregation): raising refuses the round before training
        admit(site)
    request = message.content[M.CONFIG]
    server_round, run_id = int(request[M.SERVER_ROUND]), str(request[M.RUN_ID])
    planned_rounds = int(request[M.PLANNED_ROUNDS])
    run_budget, budget, refusal = _budgets(site, config)
    if refusal:  # its ledger goes along (read only), so that an audit of the run holds a copy of every site's ledger
        return _status_reply(
            message, site, M.STATUS_POLICY_REFUSED, refusal, {M.NUM_EXAMPLES: 0}, _ledger_entries(site.state_dir / LEDGER_FILE)
        )

    state = ClientState(site.state_dir)
    with state.locked():
        record = state.load_record(client_id=site.client_id, modalities=site.modalities, accountant=config.dp.accountant)
        ledger = Ledger(state.folder / LEDGER_FILE, sync_dir=False)  # made durable as the lock is released
        ledger.entries()  # verified once a round, before any data is used: a ledger that does not verify stops here
        _settle(state, ledger, record, site.client_id)
        state.settle_staged(record)  # a model trained and charged just before a crash carries its round's update
        if record.trained(run_id, server_round):
            # Trained before a crash: re-send that update (no new privacy cost), never train twice.
            cached = state.load_reply(run_id=run_id, server_round=server_round)
            if cached is None:
                return _status_reply(
                    message,
                    site,
                    M.STATUS_ALREADY_TRAINED,
                    f"round {server_round} was trained before a restart and its update was lost; "
                    "skipping it rather than spending privacy twice",
                    {M.NUM_EXAMPLES: 0},
                    ledger.entries(),
                )
            arrays, metrics = cached
            log.info("%s: round %d already trained; re-sending its update", site.client_id, server_round)
            content = RecordDict(
                {
                    **M.pack_arrays(arrays),
                    M.METRICS: MetricRecord(metrics),
                    M.CLIENT: _identity(site, M.STATUS_OK, ledger=ledger.entries(), request=request),
                }
            )
            return Message(content, reply_to=message)

        try:
            model = _model(site, config, state, cached=True)
        except EncoderError as exc:  # refused on synthetic inputs, before any data is touched: nothing is charged
            return _status_reply(message, site, M.STATUS_POLICY_REFUSED, str(exc), {M.NUM_EXAMPLES: 0}, ledger.entries())
        shared = _shared_keys(model, config)
        reference = _merge_global(model, message, shared)
        spent_before = len(record.history.entries)
        try:
            result = train_round(
                model,
                site.train,
                record.history,
                dp=DPRequest(
                    run_budget, config.dp.delta, config.dp.max_grad_norm, planned_rounds=planned_rounds, max_epsilon=budget
                ),
                training=local_training(config.train, server_round=server_round, total_rounds=config.server.num_server_rounds),
                declared_examples=site.declared_examples,
                run_id=run_id,
                non_private_key=_non_private_key(config.server.seed, site.client_id, server_round),
                proximal_mu=config.server.proximal_mu if config.server.strategy == "fedprox" else 0.0,
                proximal_reference=reference,
            )
        except BudgetExhaustedError as exc:
            # Nothing was trained or charged: the refusal goes straight into the ledger.
            chain = _sign(
                state,
                ledger,
                _entry_fields(
                    site,
                    config,
                    run_id=run_id,
                    server_round=server_round,
                    status="refused-budget",
                    result=None,
                    epsilon=exc.epsilon_now,
                    budget=budget,
                    update_hash=None,
                    record=record,
                    run_epsilon=_run_epsilon(record, run_id),
                    run_budget=run_budget,
                ),
            )
            return _status_reply(
                message,
                site,
                M.STATUS_BUDGET_EXHAUSTED,
                str(exc),
                {
                    M.NUM_EXAMPLES: 0,
                    M.EPSILON: exc.epsilon_now,
                    M.BUDGET: run_budget,
                    M.RUN_EPSILON: _run_epsilon(record, run_id),
                    M.MAX_EPSILON: budget,
                },
                chain,
            )
        except BaseException as exc:
            # Failed after using the data (a non-finite loss, an error mid-round): the round's privacy cost stays
            # on record, in the history and the ledger, though its update is discarded.
            if len(record.history.entries) <= spent_before:
                raise
            epsilon = record.history.epsilon()
            run_epsilon = _run_epsilon(record, run_id)
            chain = _charge(
                state,
                ledger,
                record,
                _entry_fields(
                    site,
                    config,
                    run_id=run_id,
                    server_round=server_round,
                    status="discarded",
                    result=None,
                    epsilon=epsilon,
                    budget=budget,
                    update_hash=None,
                    record=record,
                    run_epsilon=run_epsilon,
                    run_budget=run_budget,
                ),
            )
            if not isinstance(exc, NonFiniteError):
                raise
            # A diverged round is the run's problem, not the site's: say so, and send the entry that charges it.
            # Only non-finite *noised* parameters get here (a DP output); the reply says nothing else about it.
            log.warning("%s: %s", site.client_id, exc)
            return _status_reply(
                message,
                site,
                M.STATUS_DISCARDED,
                DISCARDED_REASON,
                {M.NUM_EXAMPLES: 0, M.EPSILON: epsilon, M.BUDGET: run_budget, M.RUN_EPSILON: run_epsilon, M.MAX_EPSILON: budget},
                chain,
            )

        # The model tagged as this round's update is staged, then privacy is persisted, then the ledger entry; then the
        # staged model becomes the model (client/state.py): a crash at any point loses neither a spend nor an update.
        shared_set = set(shared)
        arrays = {k: v for k, v in model.state_dict().items() if k in shared_set}
        metrics = {
            M.NUM_EXAMPLES: result.num_examples,
            M.EPSILON: result.epsilon,
            M.BUDGET: run_budget,
            M.RUN_EPSILON: result.run_epsilon,
            M.MAX_EPSILON: budget,
            M.SAMPLE_RATE: result.sample_rate,
            M.STEPS: result.steps,
        }
        if result.private:
            metrics |= {M.DELTA: config.dp.delta, M.NOISE_MULTIPLIER: result.noise_multiplier}
        if config.release.train_metrics:
            metrics[M.TRAIN_LOSS] = result.train_loss
        digest = update_digest(arrays)
        state.stage_trained(model.state_dict(), shared=shared, run_id=run_id, server_round=server_round, metrics=metrics)
        record.rounds.append([run_id, server_round])
        chain = _charge(
            state,
            ledger,
            record,
            _entry_fields(
                site,
                config,
                run_id=run_id,
                server_round=server_round,
                status="trained",
                result=result,
                epsilon=result.epsilon,
                budget=budget,
                update_hash=digest,
                record=record,
                run_epsilon=result.run_epsilon,
                run_budget=run_budget,
            ),
        )
        state.commit_trained()  # its rename is made durable with the ledger's when the lock is released
        MODELS.keep(state.folder, state.folder / MODEL_FILE, _built_as(site, config), model)  # for this site's next round
        state.log_round(
            {
                "run_id": run_id,
                "round": server_round,
                "seconds": result.seconds,
                "steps": result.steps,
                "epsilon": result.epsilon,
                "train_loss": result.train_loss,
            }
        )
    log.info(
        "%s: round %d trained in %.1fs, %s",
        site.client_id,
        server_round,
        result.seconds,
        f"ε = {result.epsilon:.3f}" if result.private else "non-private",
    )
    content = RecordDict(
        {
            **M.pack_arrays(arrays),
            M.METRICS: MetricRecord(metrics),
            M.CLIENT: _identity(site, M.STATUS_OK, ledger=chain, request=request),
        }
    )
    return Message(content, reply_to=message)


def handle_evaluate(message: Message, context: Context) -> Message:
    """Evaluate the client's encoders + the global head on its held-out split, per modality subset."""
    config = parse_run_config(context.run_config)
    refused = _encoder_refusal(message, context, config)
    if refused is not None:
        return refused
    site = resolve_site(context.node_config, config, context.run_id)
    _, _, refusal = _budgets(site, config)
    if refusal:  # a site that refuses the run answers none of its messages with anything computed from its data
        return _status_reply(message, site, M.STATUS_POLICY_REFUSED, refusal, {M.NUM_EXAMPLES: 0})
    state = ClientState(site.state_dir)
    try:
        model = _model(site, config, state)
    except EncoderError as exc:
        return _status_reply(message, site, M.STATUS_POLICY_REFUSED, str(exc), {M.NUM_EXAMPLES: 0})
    _merge_global(model, message, _shared_keys(model, config))
    metrics: dict = {M.NUM_EXAMPLES: 0}
    if site.test is not None and config.release.eval_metrics:
        report = evaluate(model, site.test)
        metrics = {
            M.NUM_EXAMPLES: report["num_examples"],
            M.ACCURACY: report["accuracy"],
            M.MACRO_F1: report["macro_f1"],
            M.LOSS: report["loss"],
            M.CONFUSION: [c for row in report["confusion"] for c in row],
        }
        for subset, sub in report["by_modalities"].items():
            metrics[f"{M.BY_PREFIX}{subset}.{M.ACCURACY}"] = sub["accuracy"]
            metrics[f"{M.BY_PREFIX}{subset}.{M.MACRO_F1}"] = sub["macro_f1"]
            metrics[f"{M.BY_PREFIX}{subset}.{M.NUM_EXAMPLES}"] = sub["num_examples"]
            metrics |= {f"{M.BY_PREFIX}{subset}.{name}": sub["class_counts"][name] for name in M.CLASS_COUNTS}
        metrics |= attention_metrics(model, site.test)  # attention fusion only: weight per modality and class
    content = RecordDict({M.METRICS: MetricRecord(metrics), M.CLIENT: _identity(site, M.STATUS_OK)})
    return Message(content, reply_to=message)


def failure_reply(message: Message, context: Context) -> Message:
    """What the server learns when this site fails a message: that it failed, and which site it is (if known).

    Whatever went wrong (a bad data folder, a row that does not parse, a state folder in use, a bug) is in the
    site's own log only: an error text could carry paths, values or facts about individual records.
    """
    content = RecordDict(
        {
            M.METRICS: MetricRecord({M.NUM_EXAMPLES: 0}),
            M.CLIENT: ConfigRecord(
                {M.CLIENT_ID: _known_client_id(context), M.MODALITIES: [], M.STATUS: M.STATUS_FAILED, M.REASON: M.FAILURE_SITE}
            ),
        }
    )
    return Message(content, reply_to=message)


def _known_client_id(context: Context) -> str:
    """The site's client id if it can be told without its data: the node config's, else the simulated partition's."""
    node = context.node_config
    if node.get("client-id"):
        return str(node["client-id"])
    if "partition-id" in node:
        try:
            return resolve_site(node, parse_run_config(context.run_config), context.run_id).client_id
        except Exception:  # noqa: BLE001  (the failure itself may be here: then the server names the node)
            return ""
    return ""
