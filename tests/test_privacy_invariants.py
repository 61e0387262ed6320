"""Privacy invariants of a client's training: the properties the accounting rests on, through the real code.

- Sensitivity: one DP step on neighbouring datasets D and D + x, with the round's secret per-record
  randomness held fixed, moves the clipped-gradient sum by at most C, for every training option
  (augmentation with multiplicity K > 1 in every grad-sample mode included).
- Steps executed equal steps accounted, for every training-set size and batch size.
- Nothing about the private records leaves in a reply except the DP outputs and the metrics the README
  lists: a record that makes the loss overflow, or other records of the same number, change nothing else.
- The randomness touching records is secret (never derived from the run's seed) and drawn per record.
- The server's parameters are checked before any data is touched.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, replace

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.handlers import handle_train
from common import messages as M
from common.config import GRAD_SAMPLE_MODES, RunConfig
from common.data import synthetic
from common.data.samples import MultimodalData, hide_modalities
from common.data.schema import DatasetSchema, ModalitySpec
from common.data.site_folders import write_site
from common.errors import GlobalParametersError
from common.model.fusion import FUSIONS
from common.model.multimodal import MAX_GLOBAL_MAGNITUDE, ModelConfig, MultimodalModel, global_head_template
from common.privacy import training
from common.privacy.accounting import PrivacyHistory
from common.privacy.augmentation import Augmentation, parse_augmentations
from common.privacy.ledger import decode_entry
from common.privacy.randomness import RoundRandomness
from common.privacy.training import DPRequest, LocalTraining, _proximal, dp_step, private_training, sampling_plan, train_round

C = 1.0
N, BATCH = 40, 16  # the declared size N: q = 16 / 40 for D (40 records) and for D + x (41)
KEY = 20240917  # the test-only fixed key: held equal for D and D + x


# --- sensitivity: one DP step on D and on D + x ---------------------------------------------------------


@dataclass(frozen=True)
class Option:
    fusion: str = "attention"
    mode: str = "flat"
    dropout: float = 0.5
    missing: bool = False  # samples lacking modalities
    mu: float = 0.0  # FedProx
    init_seed: int = 1001  # local encoders: seeded per site (the handler's seed * 1000 + index + 1)
    x: str = "ordinary"  # the added record: "ordinary" or "huge" (its loss overflows)
    multiplicity: int = 1  # > 1: K rotated copies of each record (a 3-axis signal), averaged before clipping
    encoders: tuple[tuple[str, str], ...] = ()  # model.encoder: built-in or custom encoders per modality
    norm: str = "none"  # model.norm: per-sample normalisation in the CNN encoders
    width: int = 0  # model.width: the CNN encoders' channels (0 = defaults)


BASE = Option()
OPTIONS = {
    **{f"fusion-{f}": replace(BASE, fusion=f) for f in FUSIONS},
    **{f"grad-sample-{m}": replace(BASE, mode=m) for m in GRAD_SAMPLE_MODES},
    "no-modality-dropout": replace(BASE, dropout=0.0),
    "missing-modalities": replace(BASE, missing=True),
    "missing-modalities-hooks": replace(BASE, missing=True, mode="hooks"),
    "fedprox": replace(BASE, mu=0.1),
    "federated-encoders": replace(BASE, init_seed=0),  # one initialisation per modality (the handler's seed)
    "huge-record": replace(BASE, x="huge"),
    "huge-record-hooks": replace(BASE, x="huge", mode="hooks"),
    **{f"augmentation-multiplicity-{m}": replace(BASE, mode=m, multiplicity=4) for m in GRAD_SAMPLE_MODES},
    "augmentation-multiplicity-huge-record": replace(BASE, x="huge", multiplicity=4),
    "lstm-encoder-hooks": replace(BASE, mode="hooks", encoders=(("signal", "lstm"),)),
    "custom-encoder-flat": replace(BASE, encoders=(("image", "encoder_factories:small_linear"),)),
    "custom-groupnorm-encoder-hooks": replace(BASE, mode="hooks", encoders=(("signal", "encoder_factories:small_signal"),)),
    **{f"norm-{n}-{m}": replace(BASE, mode=m, norm=n) for n in ("group", "layer") for m in GRAD_SAMPLE_MODES},
    "norm-group-missing-modalities": replace(BASE, missing=True, norm="group"),
    "norm-layer-huge-record": replace(BASE, x="huge", norm="layer"),
    "norm-group-width-24-federated-encoders": replace(BASE, norm="group", width=24, init_seed=0),
}


def augmentation(option: Option) -> Augmentation | None:
    """Rotations of the (3-axis) signal, K = ``option.multiplicity`` copies per record."""
    return parse_augmentations("signal=rotate(180)", option.multiplicity) if option.multiplicity > 1 else None


def neighbours(option: Option) -> tuple[MultimodalData, MultimodalData]:
    """D (N records) and D + x (x appended)."""
    pool = synthetic.generate(N + 1, seed=3)
    if option.multiplicity > 1:  # a 3-axis signal to rotate: the synthetic one's 2 channels and half their difference
        signal = pool.inputs["signal"]
        signal = torch.cat([signal, (signal[:, :1] - signal[:, 1:2]) / 2], dim=1)
        schema = DatasetSchema(
            tuple(
                ModalitySpec("signal", "signal", tuple(signal.shape[1:])) if m.name == "signal" else m
                for m in pool.schema.modalities
            ),
            pool.schema.labels,
        )
        pool = MultimodalData(schema, dict(pool.inputs) | {"signal": signal}, pool.mask, pool.labels)
    mask = hide_modalities(pool.mask, 0.5, torch.Generator().manual_seed(4)) if option.missing else pool.mask
    inputs = dict(pool.inputs)
    if option.x == "huge":  # finite, but the forward pass of x overflows
        inputs = {k: torch.cat([v[:N], v[N:] * 1e38]) if v.is_floating_point() else v for k, v in inputs.items()}
    pool = MultimodalData(pool.schema, inputs, mask, pool.labels)
    return pool.subset(range(N)), pool


def flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([v.detach().reshape(-1).clone() for v in model.state_dict().values()])


def clipped_sum(data: MultimodalData, option: Option, step: int, declared: int) -> torch.Tensor:
    """The sum of clipped per-sample gradients of step ``step`` (noise off), through training's own step.

    As in the training loop: the step's Poisson batch, dp_step (modality dropout, per-sample gradients,
    clipping, Opacus's DPOptimizer) and FedProx's pull; with lr 1 and no momentum, the parameters move by
    minus the clipped sum over the expected batch size. q, the steps and the expected batch size come from
    the public ``declared`` training-set size, as in ``train_round``.
    """
    q, per_epoch = sampling_plan(declared, BATCH, 1)
    with torch.random.fork_rng(devices=[]):  # the head's initial weights too (the server sends them)
        torch.manual_seed(option.init_seed)
        model = MultimodalModel(
            data.schema,
            ModelConfig(
                option.fusion,
                16,
                16,
                encoder=",".join(f"{m}={c}" for m, c in option.encoders),
                norm=option.norm,
                width=option.width,
            ),
            seed=option.init_seed,
        )
    before = flat_parameters(model)
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}  # the global values (FedProx)
    private = private_training(
        model,
        len(data),
        accountant="prv",
        noise_multiplier=0.0,
        max_grad_norm=C,
        batch_size=BATCH,
        lr=1.0,
        momentum=0.0,
        grad_sample_mode=option.mode,
        randomness=RoundRandomness(KEY),
        sample_rate=q,
        steps_per_epoch=per_epoch,
        expected_batch_size=q * declared,
    )
    pull = _proximal(model, option.mu, reference, 1.0)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            dp_step(
                private, data, private.batch(step), modality_dropout=option.dropout, step=step, augmentation=augmentation(option)
            )
        pull()
    finally:
        private.close()
    return -(flat_parameters(model) - before) * private.optimizer.expected_batch_size


def step_sampling(n: int, record: int) -> int:
    """The first step after the first at which ``record`` is in the Poisson batch under KEY."""
    randomness = RoundRandomness(KEY)
    return next(
        t
        for t in range(1, 100)
        if record in randomness.poisson_batch(t, num_examples=n, sample_rate=sampling_plan(N, BATCH, 1)[0])
    )


@pytest.mark.parametrize("option", list(OPTIONS.values()), ids=list(OPTIONS))
def test_one_dp_step_on_neighbouring_datasets_moves_the_clipped_sum_by_at_most_c(option):
    # Prepare: neighbouring datasets with the same public plan (declared size), and a (later) step at which x is sampled
    small, large = neighbours(option)
    step = step_sampling(len(large), N)
    # Execute
    a, b = clipped_sum(small, option, step, declared=N), clipped_sum(large, option, step, declared=N)
    # Assert: the other records did exactly the same (sampled, masked, clipped); x moved the sum by <= C
    assert a.norm() > 0.5 * C  # a real step with several clipped records
    distance = float((b - a).norm())
    assert distance <= C * (1 + 1e-4) + 1e-5, f"neighbouring datasets moved the clipped sum by {distance:.3f} > C = {C}"
    if option.x == "huge":
        assert distance < 1e-4  # a record whose loss overflows takes no part (zero before clipping)
        assert torch.isfinite(b).all()
    else:
        assert distance > 1e-3 * C  # x really took part


def test_randomness_is_drawn_per_record_so_adding_one_changes_no_other_records_choices():
    # Prepare: the same secret key for D (300 records) and D + x (301); x appended
    randomness, mask = RoundRandomness(KEY), torch.ones(301, 3, dtype=torch.bool)
    for step in range(20):
        # Execute
        small = randomness.poisson_batch(step, num_examples=300, sample_rate=0.3)
        large = randomness.poisson_batch(step, num_examples=301, sample_rate=0.3)
        masks_small = randomness.hide_modalities(step, small, mask[small], 0.6, num_examples=300)
        masks_large = randomness.hide_modalities(step, large, mask[large], 0.6, num_examples=301)
        # Assert: the first 300 records are sampled and masked alike in both
        assert torch.equal(large[large < 300], small)
        assert torch.equal(masks_large[large < 300], masks_small)


def test_randomness_touching_records_is_secret_and_fresh_each_round():
    # Two rounds with every public parameter equal draw different batches and masks
    a, b = RoundRandomness(), RoundRandomness()
    assert not torch.equal(
        a.poisson_batch(0, num_examples=1000, sample_rate=0.5), b.poisson_batch(0, num_examples=1000, sample_rate=0.5)
    )
    idx, mask = torch.arange(1000), torch.ones(1000, 3, dtype=torch.bool)
    assert not torch.equal(
        a.hide_modalities(0, idx, mask, 0.5, num_examples=1000), b.hide_modalities(0, idx, mask, 0.5, num_examples=1000)
    )


# --- steps executed == steps accounted ------------------------------------------------------------------


def tabular(n: int) -> MultimodalData:
    """``n`` records of a tiny tabular schema."""
    schema = synthetic.schema().restrict(["tabular"])
    g = torch.Generator().manual_seed(n)
    return MultimodalData(
        schema,
        {"tabular": torch.randn(n, 8, generator=g)},
        torch.ones(n, 1, dtype=torch.bool),
        torch.randint(0, 6, (n,), generator=g),
    )


# (batch size, n): around the sizes where Opacus's own sampler took int(1 / q) steps an epoch, one too few
# (batch 1: n = 93, 99; batch 64: n = 5889-5952), and the edges of a batch
STEP_CASES = (
    [(1, n) for n in (1, 2, 92, 93, 99)]
    + [(64, n) for n in (1, 63, 64, 65, 5888, 5889, 5900, 5952, 5953)]
    + [(93, n) for n in (92, 93, 94, 5000)]
    + [(7, n) for n in (13, 14, 15, 700)]
)


@pytest.mark.parametrize("batch_size, n", STEP_CASES, ids=[f"batch{b}-n{n}" for b, n in STEP_CASES])
def test_the_training_loop_draws_exactly_the_accounted_batches_for_every_n(monkeypatch, batch_size, n):
    # Prepare: the real DP loop (_train_dp, as train_round calls it) on n records; each drawn batch is counted,
    # then stepped as an empty batch (a noised, accounted step without a forward pass: cheap for every n)
    epochs = 2
    q, steps = sampling_plan(n, batch_size, epochs)
    drawn, wrapped = [], []
    real_step, real_private = training.dp_step, training.private_training

    def counting_step(private, data, idx, *, modality_dropout, step, **rest):
        drawn.append(step)
        assert idx.dtype == torch.long and (idx.numel() == 0 or 0 <= int(idx.min()) <= int(idx.max()) < n)
        return real_step(private, data, idx[:0], modality_dropout=modality_dropout, step=step, **rest)

    monkeypatch.setattr(training, "dp_step", counting_step)
    monkeypatch.setattr(training, "private_training", lambda *a, **k: wrapped.append(real_private(*a, **k)) or wrapped[-1])
    data = tabular(n)
    model = MultimodalModel(data.schema, ModelConfig("concat", 8, 8))
    # Execute
    training._train_dp(
        model,
        data,
        PrivacyHistory(),
        noise_multiplier=1.0,
        sample_rate=q,
        max_grad_norm=C,
        local_epochs=epochs,
        batch_size=batch_size,
        lr=0.1,
        momentum=0.0,
        modality_dropout=0.0,
        grad_sample_mode="flat",
        randomness=RoundRandomness(KEY),
        expected_steps=steps,
        expected_batch_size=q * n,
        proximal=lambda: None,
    )
    # Assert: ceil(N / batch) batches an epoch at q = batch / N were drawn, stepped and accounted
    assert (q, steps) == (min(1.0, batch_size / n), epochs * math.ceil(n / batch_size))
    assert drawn == list(range(steps))
    assert wrapped[0].steps_counted() == steps and {r for _, r, _ in wrapped[0].accountant.history} == {q}


def test_a_round_at_n_5900_batch_64_executes_the_93_steps_it_is_charged(monkeypatch):
    # Prepare: a tiny tabular model on 5900 records (Opacus's sampler would take 92 steps: 1 / (1 / 93) < 93)
    schema = synthetic.schema().restrict(["tabular"])
    g = torch.Generator().manual_seed(0)
    data = MultimodalData(
        schema,
        {"tabular": torch.randn(5900, 8, generator=g)},
        torch.ones(5900, 1, dtype=torch.bool),
        torch.randint(0, 6, (5900,), generator=g),
    )
    model, history = MultimodalModel(schema, ModelConfig("concat", 8, 8)), PrivacyHistory()
    executed = []
    real_step = training.dp_step
    monkeypatch.setattr(training, "dp_step", lambda *a, **k: executed.append(k["step"]) or real_step(*a, **k))
    # Execute
    result = train_round(
        model,
        data,
        history,
        dp=DPRequest(8.0, 1e-5, 1.0, planned_rounds=1),
        training=LocalTraining(local_epochs=1, batch_size=64),
    )
    # Assert: executed, accounted and reported steps agree, at the accounted rate
    sigma = history.entries[0][0]
    assert executed == list(range(93))
    assert history.entries == [(sigma, 64 / 5900, 93)]
    assert (result.steps, result.sample_rate) == (93, 64 / 5900)


# --- replies: nothing but DP outputs and README-listed metrics depends on the records --------------------


def head() -> dict[str, torch.Tensor]:
    return global_head_template(["image", "signal", "tabular"], 6, ModelConfig())


def train_message(arrays: dict[str, torch.Tensor], server_round: int = 1) -> Message:
    config = ConfigRecord({M.SERVER_ROUND: server_round, M.RUN_ID: "run-a", M.PLANNED_ROUNDS: 2})
    return Message(RecordDict({**M.pack_arrays(arrays), M.CONFIG: config}), dst_node_id=11, message_type="train")


def site_context(tmp_path, name: str, data: MultimodalData, **run_overrides) -> Context:
    """A deployed site (its own folder, state and policy) holding ``data`` (50 train, 10 test records)."""
    write_site(tmp_path / name, data, ["train"] * 50 + ["test"] * 10, name="hospital")
    node = {
        "data-dir": str(tmp_path / name),
        "state-dir": str(tmp_path / f"{name}-state"),
        "max-epsilon": 4.0,
        "client-id": "hospital",
        "num-train-examples": 50,
    }
    flat = (
        RunConfig().to_flat()
        | {
            "out-dir": str(tmp_path / "run"),
            "dp.epsilon": 3.0,
            "train.batch-size": 50,
            "train.local-epochs": 2,
            "train.modality-dropout": 0.5,
        }
        | run_overrides
    )
    return Context(run_id=5, node_id=11, node_config=node, state=RecordDict(), run_config=flat)


def planted(data: MultimodalData, rows: list[int], scale: float) -> MultimodalData:
    """``data`` with the records ``rows`` scaled by ``scale`` (finite; their loss overflows)."""
    inputs = {k: v.clone() for k, v in data.inputs.items()}
    for v in inputs.values():
        if v.is_floating_point():
            v[rows] *= scale
    return MultimodalData(data.schema, inputs, data.mask, data.labels)


def public_view(reply: Message) -> dict:
    """Everything in a train reply except the DP outputs (the parameters' values, their digest) and what is
    signed per site (key, hashes, signature, time)."""
    content = reply.content
    arrays = M.unpack_arrays(content)
    ident = dict(content[M.CLIENT])
    ledger = [decode_entry(e) for e in ident.pop(M.LEDGER, [])]
    per_site = {"update_hash", "entry_hash", "prev_hash", "signature", "public_key", "time"}
    return {
        "records": sorted(content.keys()),
        "shapes": {k: tuple(v.shape) for k, v in arrays.items()},
        "metrics": dict(content[M.METRICS]),
        "identity": ident,
        "ledger": [{k: v for k, v in e.items() if k not in per_site} for e in ledger],
    }


REPLY_OPTIONS = {
    "default": {},
    "fusion-late": {"model.fusion": "late"},
    "grad-sample-hooks": {"train.grad-sample-mode": "hooks"},
    "federated-encoders": {"encoders": "federated"},
    "fedprox": {"strategy": "fedprox"},
    "norm-group": {"model.norm": "group", "model.width": 24},
}


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("overrides", list(REPLY_OPTIONS.values()), ids=list(REPLY_OPTIONS))
def test_replies_depend_on_the_records_only_through_the_dp_outputs(tmp_path, monkeypatch, overrides):
    # Prepare: three sites of 60 records: D, D with records whose loss overflows, and other records; q = 1,
    # two steps, so the planted records are sampled; spy on the rows zeroed before clipping
    clean = synthetic.generate(60, seed=1)
    sites = {"clean": clean, "planted": planted(clean, [3, 7, 11], 1e38), "other": synthetic.generate(60, seed=2)}
    zeroed = {}
    clip = training.FiniteRowsDPOptimizer.clip_and_accumulate

    def spy(self):
        rows = torch.stack([(~torch.isfinite(g.reshape(len(g), -1))).any(dim=1) for g in self.grad_samples]).any(dim=0)
        zeroed[site] = zeroed.get(site, 0) + int(rows.sum())
        return clip(self)

    monkeypatch.setattr(training.FiniteRowsDPOptimizer, "clip_and_accumulate", spy)
    # Execute: the same round with the same head at each site
    views = {}
    for site, data in sites.items():
        arrays = global_head_template(["image", "signal", "tabular"], 6, ModelConfig(overrides.get("model.fusion", "attention")))
        # no modality dropout here: with every modality present the planted records overflow whatever the secret
        # draws (with dropout, a record left with one modality whose logits stay finite would not overflow)
        context = site_context(tmp_path, site, data, **({"train.modality-dropout": 0.0} | overrides))
        views[site] = public_view(handle_train(train_message(arrays), context))
    # Assert: the planted records really overflowed, inside the mechanism
    assert zeroed["planted"] > 0 and zeroed["clean"] == zeroed["other"] == 0
    # Assert: status, reason, metrics, parameter names and shapes and the ledger entry are the same
    assert views["clean"]["identity"][M.STATUS] == M.STATUS_OK
    assert views["clean"]["metrics"][M.NUM_EXAMPLES] == 50 and M.TRAIN_LOSS not in views["clean"]["metrics"]
    for name in ("planted", "other"):
        for part, value in views["clean"].items():
            assert views[name][part] == value, f"{name}: the reply's {part} depends on the private records"


@pytest.mark.usefixtures("task_identity")
def test_a_discarded_round_says_nothing_computed_from_the_data(tmp_path):
    # Prepare: a learning rate and clipping norm so large that the noised parameters overflow
    context = site_context(tmp_path, "site", synthetic.generate(60, seed=1), **{"train.lr": 1e38, "dp.max-grad-norm": 1e3})
    # Execute
    reply = handle_train(train_message(head()), context)
    # Assert: discarded (from the noised parameters), charged, and the reason names no step, loss or value
    ident = reply.content[M.CLIENT]
    assert ident[M.STATUS] == M.STATUS_DISCARDED and M.ARRAYS not in reply.content.array_records
    assert not re.search(r"\d", ident[M.REASON]), ident[M.REASON]
    assert [decode_entry(e)["status"] for e in ident[M.LEDGER]] == ["discarded"]


# --- the server's parameters are checked before any data is touched -------------------------------------


def bad_heads() -> dict[str, dict[str, torch.Tensor]]:
    good = head()
    key = "head.core.classifier.weight"
    nan, huge, shape = dict(good), dict(good), dict(good)
    nan[key] = good[key].clone().fill_(math.nan)
    huge[key] = good[key].clone()
    huge[key][0, 0] = 10 * MAX_GLOBAL_MAGNITUDE  # finite: could make one label's loss overflow
    shape[key] = good[key][:1]
    missing = {k: v for k, v in good.items() if k != key}
    unknown = good | {"optimizer.state": torch.zeros(3)}
    return {"nan": nan, "huge": huge, "shape": shape, "missing": missing, "unknown": unknown}


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("case", list(bad_heads()))
def test_a_malformed_or_hostile_head_is_refused_before_any_data_is_touched(tmp_path, case, monkeypatch):
    touched = []
    monkeypatch.setattr(training, "_train_dp", lambda *a, **k: touched.append(1))
    context = site_context(tmp_path, "site", synthetic.generate(60, seed=1))
    with pytest.raises(GlobalParametersError, match="the server"):
        handle_train(train_message(bad_heads()[case]), context)
    assert touched == [] and not (tmp_path / "site-state" / "privacy.json").exists()  # nothing trained or charged


@pytest.mark.usefixtures("task_identity")
def test_modality_dropout_of_a_dp_round_is_not_a_function_of_the_runs_public_parameters(tmp_path, monkeypatch):
    # Prepare: the same site, data, head, seed, client id and round twice (fresh state); q = 1, so both rounds'
    # first batch holds every record in the same order; spy on the masks the model sees
    data = synthetic.generate(60, seed=1)
    seen = []
    forward = MultimodalModel.forward
    monkeypatch.setattr(
        MultimodalModel, "forward", lambda self, inputs, mask: seen.append(mask.clone()) or forward(self, inputs, mask)
    )
    firsts = []
    for name in ("first", "second"):
        seen.clear()
        # Execute
        handle_train(train_message(head()), site_context(tmp_path, name, data, **{"train.modality-dropout": 0.5}))
        firsts.append(seen[0])
    # Assert: the server, which knows every public parameter, cannot predict which modalities were hidden
    assert firsts[0].shape == firsts[1].shape == (50, 3)
    same = (firsts[0] == firsts[1]).all(dim=1).float().mean()
    assert same < 0.5, f"{same:.0%} of the records got the same modality dropout in both rounds"


# --- an empty Poisson batch: a noised, accounted step, whatever the mode ----------------------------------


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_an_empty_poisson_batch_takes_a_noised_accounted_step_in_every_grad_sample_mode(mode):
    # Prepare: a small model wrapped for DP-SGD with noise on; an empty batch (no record sampled)
    data = synthetic.generate(8, seed=5)
    model = MultimodalModel(data.schema, ModelConfig("attention", 16, 16), seed=1)
    before = flat_parameters(model)
    private = private_training(
        model,
        len(data),
        accountant="prv",
        noise_multiplier=1.0,
        max_grad_norm=C,
        batch_size=4,
        lr=0.1,
        momentum=0.0,
        grad_sample_mode=mode,
        randomness=RoundRandomness(KEY),
        sample_rate=0.5,
        steps_per_epoch=2,
        expected_batch_size=4.0,
    )
    # Execute
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss = dp_step(private, data, torch.zeros(0, dtype=torch.long), modality_dropout=0.5, step=0)
    finally:
        private.close()
    # Assert: no error and no loss; the step was taken (noise moved every parameter) and accounted
    after = flat_parameters(model)
    assert loss is None
    assert torch.isfinite(after).all()
    assert (after != before).float().mean() > 0.9, "an empty batch must still add noise to the parameters"
    assert private.steps_counted() == 1 and [q for _, q, _ in private.accountant.history] == [0.5]


@pytest.mark.parametrize("n, batch_size", [(10, 4), (5900, 64), (3, 8)])
def test_private_training_without_a_plan_uses_the_one_definition_of_q(n, batch_size):
    # Without sample_rate (benchmarks, tools): q, steps and the expected batch are sampling_plan's on the count n
    model = MultimodalModel(tabular(1).schema, ModelConfig("concat", 8, 8))
    private = private_training(
        model,
        n,
        accountant="prv",
        noise_multiplier=1.0,
        max_grad_norm=C,
        batch_size=batch_size,
        lr=0.1,
        momentum=0.0,
        grad_sample_mode="flat",
    )
    private.close()
    q, steps = sampling_plan(n, batch_size, 1)
    assert (private.sample_rate, private.sampler.steps_per_epoch) == (q, steps)
    assert private.optimizer.expected_batch_size == q * n
