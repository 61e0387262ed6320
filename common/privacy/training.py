"""One round of a client's local training: encoders + head with Opacus DP-SGD.

DP-SGD here means Poisson sampling (each record joins each step with probability q), per-sample
gradient clipping to norm C over *all* of the client's parameters, and Gaussian noise of standard
deviation sigma * C on their sum. q, the number of steps and sigma come from public parameters only:
the site's *declared* training-set size N (never the count of its records), the batch size and the
budgets, so neighbouring datasets get the same mechanism. Every random choice that touches records
(sampling, modality dropout, noise) comes from secret per-round, per-record randomness
(:mod:`common.privacy.randomness`); the batches come from fedfuse's own Poisson sampler, which takes exactly the
accounted number of steps. A record whose loss or per-sample gradient is not finite contributes zero
before clipping (so the sensitivity stays C): nothing about it leaves the mechanism, and whether a round
is kept depends only on its noised parameters. The noise multiplier sigma is calibrated once per run,
for the client's whole planned participation, against both the run's allowance and the site's lifetime
cap; before any data is touched the round is refused if it would exceed either (fail closed).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from opacus.accountants import IAccountant, create_accountant
from opacus.grad_sample import prepare_module
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.validators import ModuleValidator

from common.config import GRAD_SAMPLE_MODES, LR_SCHEDULES, TrainSection
from common.data.samples import MultimodalData
from common.errors import DataError, NonFiniteError, PrivacyParameterError
from common.model.multimodal import MultimodalModel
from common.privacy.accounting import NoisePlan, PrivacyHistory, calibrate_run, validate_privacy_parameters
from common.privacy.augmentation import Augmentation, parse_augmentations
from common.privacy.grad_samplers import FlatGradSample
from common.privacy.randomness import RoundRandomness

log = logging.getLogger(__name__)
LR_FLOOR = 0.1  # the cosine schedule ends at this fraction of train.lr


@dataclass(frozen=True)
class RoundResult:
    """What one round of local training did. ``train_loss`` is computed on private data without DP."""

    private: bool
    epsilon: float  # lifetime: the client's whole history, after this round (inf when non-private)
    delta: float | None
    noise_multiplier: float | None
    sample_rate: float
    steps: int
    max_grad_norm: float | None
    num_examples: int  # the declared (public) training-set size: the aggregation weight, never the count of records
    train_loss: float  # mean over the round's batches; private information, not DP
    seconds: float
    run_epsilon: float = math.inf  # this run's own mechanisms alone, after this round (inf when non-private)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Number of DP-SGD steps in one epoch of ``num_examples`` (the declared size) records."""
    return math.ceil(num_examples / batch_size)


def sampling_plan(declared_examples: int, batch_size: int, local_epochs: int) -> tuple[float, int]:
    """(q, steps) of one round: q = batch / N and ceil(N / batch) steps per epoch, N the declared size.

    Public by construction: the same for every dataset the site could hold, so neighbours that differ by
    one record (add/remove) run the same mechanism.
    """
    if not isinstance(declared_examples, int) or isinstance(declared_examples, bool) or declared_examples < 1:
        raise PrivacyParameterError(f"the declared training-set size must be a positive integer, got {declared_examples!r}")
    return min(1.0, batch_size / declared_examples), local_epochs * steps_per_epoch(declared_examples, batch_size)


def check_compatible(model: MultimodalModel, data: MultimodalData) -> None:
    """The data must have exactly the model's modalities with the same specs and labels."""
    if data.schema.modalities != model.schema.modalities:
        raise DataError(
            f"the data's modalities {[m.to_dict() | {'name': m.name} for m in data.schema.modalities]} do not "
            f"match the client's schema {[m.to_dict() | {'name': m.name} for m in model.schema.modalities]}"
        )
    if data.schema.labels != model.schema.labels:
        raise DataError(f"the data's labels {list(data.schema.labels)} differ from the model's {list(model.schema.labels)}")


def _batch(data: MultimodalData, idx: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    return {n: x[idx] for n, x in data.inputs.items()}, data.mask[idx], data.labels[idx]


def _batch_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float | None]:
    """The batch's loss to differentiate (mean over the batch, non-finite rows counting zero) and its
    mean over the finite rows (None if there are none): a record whose loss overflows takes no part."""
    losses = F.cross_entropy(logits, labels, reduction="none")  # (B,)
    finite = torch.isfinite(losses)
    loss = torch.where(finite, losses, 0.0).sum() / max(len(losses), 1)  # Opacus's loss_reduction="mean"
    kept = int(finite.sum())
    value = float(torch.where(finite, losses.detach(), 0.0).sum()) / kept if kept else None
    return loss, value


@dataclass(frozen=True)
class DPRequest:
    """The privacy a client's round must keep: public parameters, the same for every dataset the site could hold."""

    epsilon: float  # the run's allowance (dp.epsilon): this run's own mechanisms, composed over the run; inf = non-private
    delta: float
    max_grad_norm: float  # per-sample clipping norm C
    planned_rounds: int  # the rounds this client plans to train in this run: the noise is calibrated for all of them
    max_epsilon: float | None = None  # the site's lifetime cap on its whole history (None: the same as epsilon)

    def __post_init__(self) -> None:
        validate_privacy_parameters(target_epsilon=self.epsilon, delta=self.delta, max_grad_norm=self.max_grad_norm)
        if not isinstance(self.planned_rounds, int) or isinstance(self.planned_rounds, bool) or self.planned_rounds < 1:
            raise PrivacyParameterError(f"planned_rounds must be a positive integer, got {self.planned_rounds!r}")
        cap = self.cap
        if not (isinstance(cap, (int, float)) and cap > 0):
            raise PrivacyParameterError(f"the site's lifetime cap max-epsilon must be > 0, got {cap!r}")
        if math.isinf(self.epsilon) and not math.isinf(cap):
            raise PrivacyParameterError(f"a non-private run (ε = inf) needs a site without a cap, not max-epsilon = {cap:g}")

    @property
    def cap(self) -> float:
        """The site's lifetime cap (``max_epsilon``, default the run's allowance)."""
        return self.epsilon if self.max_epsilon is None else self.max_epsilon

    @property
    def private(self) -> bool:
        return not math.isinf(self.epsilon)


@dataclass(frozen=True)
class LocalTraining:
    """How a client trains locally in one round (the optimiser settings); none of it is computed from records."""

    local_epochs: int  # passes of the public plan: ceil(N / batch) steps each
    batch_size: int  # the expected Poisson batch is q N = batch_size (N the declared size)
    lr: float = 0.5  # client learning rate (SGD)
    momentum: float = 0.5
    modality_dropout: float = 0.0  # hide each present modality with this probability (secret, per record)
    grad_sample_mode: str = "flat"  # per-sample gradients: flat | hooks | functorch
    augmentation: Augmentation = Augmentation()  # K augmented copies per record, averaged before clipping

    def __post_init__(self) -> None:
        for name in ("local_epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PrivacyParameterError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= self.modality_dropout < 1:
            raise ValueError(f"modality_dropout must lie in [0, 1), got {self.modality_dropout}")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"grad_sample_mode must be one of {list(GRAD_SAMPLE_MODES)}, got '{self.grad_sample_mode}'")


def scheduled_lr(lr: float, schedule: str, server_round: int, total_rounds: int) -> float:
    """The client learning rate of round ``server_round`` (1-based) of ``total_rounds``: ``constant``, or ``cosine``
    from ``lr`` in round 1 down to LR_FLOOR x ``lr`` in the last. Public: a function of the round number only."""
    if schedule == "constant" or total_rounds <= 1:
        return lr
    if schedule != "cosine":
        raise ValueError(f"lr schedule must be one of {list(LR_SCHEDULES)}, got '{schedule}'")
    progress = min(max(server_round - 1, 0) / (total_rounds - 1), 1.0)
    return lr * (LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress)))


def local_training(train: TrainSection, *, server_round: int = 1, total_rounds: int = 1) -> LocalTraining:
    """The run config's ``[train]`` section as round ``server_round``'s :class:`LocalTraining` (the schedule's lr)."""
    lr = scheduled_lr(train.lr, train.lr_schedule, server_round, total_rounds)
    return LocalTraining(
        local_epochs=train.local_epochs,
        batch_size=train.batch_size,
        lr=lr,
        momentum=train.momentum,
        modality_dropout=train.modality_dropout,
        grad_sample_mode=train.grad_sample_mode,
        augmentation=parse_augmentations(train.augmentations, train.multiplicity),
    )


def train_round(
    model: MultimodalModel,
    data: MultimodalData,
    history: PrivacyHistory,
    *,
    dp: DPRequest,
    training: LocalTraining,
    declared_examples: int | None = None,
    run_id: str = "run",
    proximal_mu: float = 0.0,
    proximal_reference: dict[str, torch.Tensor] | None = None,
    non_private_key: int | None = None,
    _noise_scale: float = 1.0,
    _randomness: RoundRandomness | None = None,
) -> RoundResult:
    """Train ``model`` (in place) on ``data`` for one round; update ``history`` with the round's mechanism.

    ``dp.epsilon`` is the run's allowance (``dp.epsilon``: this run's own mechanisms, composed over
    the run) and ``dp.max_epsilon`` the site's lifetime cap on the whole history (default: the same value).
    ``declared_examples`` is the public training-set size N the mechanism is derived from (default: the
    count of ``data``, for tests and tools whose size is public anyway).

    ``dp.epsilon = math.inf`` trains without DP; the round is recorded in the history with noise
    multiplier 0 and its real steps, and the client's epsilon is infinite from then on. A private
    request on such a history is refused (NonPrivateHistoryError). On error the model is restored to
    its state before the round. With ``proximal_mu > 0`` (FedProx) every step
    also pulls the parameters named in ``proximal_reference`` towards it; that pull uses no data, so
    it is applied after the DP step and costs no privacy. ``non_private_key`` fixes the shuffling and modality
    dropout of a non-private round (reproducible runs; there is no privacy to keep); a DP round ignores it and
    always draws a fresh secret key. ``_noise_scale`` exists for the empirical
    privacy audit's negative test only, ``_randomness`` (a fixed key for sampling, modality dropout and
    noise) for tests that need bit-identical rounds only: neither is reachable from any configuration.
    """
    # Everything else was checked when dp and training were built; the data last, before touching it.
    if not isinstance(dp, DPRequest) or not isinstance(training, LocalTraining):
        raise TypeError(
            f"train_round needs a DPRequest and a LocalTraining, got {type(dp).__name__} and {type(training).__name__}"
        )
    target_epsilon, delta, max_grad_norm, planned_rounds = dp.epsilon, dp.delta, dp.max_grad_norm, dp.planned_rounds
    max_epsilon = dp.cap
    local_epochs, batch_size, lr, momentum = training.local_epochs, training.batch_size, training.lr, training.momentum
    modality_dropout, grad_sample_mode = training.modality_dropout, training.grad_sample_mode
    augmentation = training.augmentation
    check_compatible(model, data)
    augmentation.check(model.schema)
    n = len(data) if declared_examples is None else declared_examples
    sample_rate, steps = sampling_plan(n, batch_size, local_epochs)
    randomness = _randomness or _round_randomness(target_epsilon, non_private_key)
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    start = time.perf_counter()
    model.train()

    if math.isinf(target_epsilon):
        # Charged before the data is touched, like a private round: its data leaves without DP, for good.
        history.record((0.0, sample_rate, steps), run_id=run_id)
        loss = _train_non_private(
            model,
            data,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            momentum=momentum,
            modality_dropout=modality_dropout,
            augmentation=augmentation,
            randomness=randomness,
            snapshot=snapshot,
            proximal=_proximal(model, proximal_mu, proximal_reference, lr),
        )
        return RoundResult(False, math.inf, None, None, sample_rate, steps, None, n, loss, time.perf_counter() - start)

    # Refuse a private request on a history that is already non-private, before anything else.
    history.refuse_if_non_private(budget=target_epsilon)
    # Calibrate the noise once per run for the whole planned participation; check both budgets.
    if history.delta is not None and history.delta != delta:
        raise PrivacyParameterError(
            f"delta {delta:g} differs from the delta {history.delta:g} of this client's earlier rounds; "
            "one client's history must use one delta"
        )
    plan_params = dict(
        run_id=run_id,
        sample_rate=sample_rate,
        steps_per_round=steps,
        planned_rounds=planned_rounds,
        target_epsilon=target_epsilon,
        delta=delta,
        max_grad_norm=max_grad_norm,
    )
    plan = history.plan
    if plan is None or plan.run_id != run_id:
        sigma = calibrate_run(
            history=history.entries,
            sample_rate=sample_rate,
            steps=steps * planned_rounds,
            run_budget=target_epsilon,
            lifetime_budget=max_epsilon,
            delta=delta,
            accountant=history.accountant,
            run_history=history.run_entries(run_id),
        )
        plan = NoisePlan(noise_multiplier=sigma, **plan_params)
        log.info(
            "calibrated noise multiplier %.4f for %d rounds x %d steps at q = %.4f", sigma, planned_rounds, steps, sample_rate
        )
    elif not plan.matches(**plan_params):
        raise PrivacyParameterError(
            f"the privacy parameters changed during run '{run_id}' (planned {plan}, now {plan_params}); "
            "the noise was calibrated for the original plan: start a new run to change them"
        )
    mechanism = (plan.noise_multiplier, sample_rate, steps)
    history.delta = delta  # unchanged, or fixed now for a client that has not trained yet
    previous_plan, history.plan = history.plan, plan
    try:
        epsilon_after, run_epsilon_after = history.check_budgets(mechanism, budget=max_epsilon, run_budget=target_epsilon)
    except BaseException:
        history.plan = previous_plan
        raise

    # From here on the data is used: the round is charged to the history even if it fails.
    try:
        loss = _train_dp(
            model,
            data,
            history,
            noise_multiplier=plan.noise_multiplier * _noise_scale,
            sample_rate=sample_rate,
            max_grad_norm=max_grad_norm,
            local_epochs=local_epochs,
            batch_size=batch_size,
            lr=lr,
            momentum=momentum,
            modality_dropout=modality_dropout,
            grad_sample_mode=grad_sample_mode,
            augmentation=augmentation,
            randomness=randomness,
            expected_steps=steps,
            expected_batch_size=sample_rate * n,
            proximal=_proximal(model, proximal_mu, proximal_reference, lr),
        )
    except BaseException:
        model.load_state_dict(snapshot)
        raise
    finally:
        history.record(mechanism, run_id=run_id)
    return RoundResult(
        True,
        epsilon_after,
        delta,
        plan.noise_multiplier,
        sample_rate,
        steps,
        max_grad_norm,
        n,
        loss,
        time.perf_counter() - start,
        run_epsilon_after,
    )


def _round_randomness(target_epsilon: float, non_private_key: int | None) -> RoundRandomness:
    """A DP round's randomness always comes from a fresh secret OS key; a non-private one may use the run's."""
    if math.isinf(target_epsilon) and non_private_key is not None:
        return RoundRandomness(non_private_key)
    return RoundRandomness()


class FiniteRowsDPOptimizer(DPOptimizer):
    """Opacus's :class:`DPOptimizer` with one change inside the mechanism: a sample whose per-sample gradient
    is not finite (or whose norm overflows) contributes zero instead of poisoning the sum.

    Each row is still clipped to norm C and the sum still gets N(0, sigma^2 C^2) noise, so a record moves
    the clipped sum by at most C whatever it holds; no decision outside the mechanism depends on it.
    """

    def clip_and_accumulate(self) -> None:
        """Clip each sample's gradient to ``max_grad_norm`` over all parameters, zeroing non-finite rows; sum."""
        bad = None
        if len(self.grad_samples[0]) == 0:  # an empty Poisson batch
            clip_factor = torch.zeros((0,), device=self.grad_samples[0].device)
        else:
            per_param = [g.reshape(len(g), -1).norm(2, dim=-1) for g in self.grad_samples]  # P x (B,)
            norms = torch.stack(per_param, dim=1).norm(2, dim=1)  # (B,)
            bad = ~torch.isfinite(norms)  # (B,) a NaN or inf entry, or squares overflowing float32
            if bad.any():
                norms = torch.where(bad, torch.zeros_like(norms), norms)
            else:
                bad = None
            clip_factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for p in self.params:
            _check_processed_flag(p.grad_sample)
            grad_sample = self._get_flat_grad_sample(p).to(p.dtype)
            if bad is not None:  # the row takes no part: a zero clip factor times inf would still be NaN
                grad_sample = grad_sample.masked_fill(bad.view(-1, *[1] * (grad_sample.dim() - 1)), 0.0)
            grad = torch.einsum("i,i...", clip_factor.to(grad_sample.device, p.dtype), grad_sample)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            _mark_as_processed(p.grad_sample)


@dataclass(frozen=True)
class PoissonSampler:
    """fedfuse's Poisson batch sampler over ``num_examples`` records: ``steps_per_epoch`` steps an epoch, each
    record joining each step independently with probability ``sample_rate``, drawn from the round's secret
    per-record randomness. The rate and the step count are the public plan's (:func:`sampling_plan`), exactly
    what the accountant is charged (Opacus's uniform sampler takes ``int(1 / q)`` steps per epoch: one too few
    for some q, e.g. 92 for q = 1 / 93)."""

    num_examples: int
    sample_rate: float
    steps_per_epoch: int
    randomness: RoundRandomness

    def steps(self, local_epochs: int) -> range:
        """The step numbers of ``local_epochs`` epochs."""
        return range(local_epochs * self.steps_per_epoch)

    def batch(self, step: int) -> torch.Tensor:
        """Step ``step``'s batch (row indices)."""
        return self.randomness.poisson_batch(step, num_examples=self.num_examples, sample_rate=self.sample_rate)


@dataclass
class PrivateTraining:
    """DP-SGD pieces for one round: call ``model``, step ``optimizer`` on the Poisson batch of each step."""

    model: torch.nn.Module
    optimizer: DPOptimizer
    accountant: IAccountant  # Opacus's; its history gets (sigma, q, 1) for every optimizer step
    close: Callable[[], None]  # removes the per-sample gradient machinery from the client's model
    sampler: PoissonSampler  # the round's batches, from its secret per-record randomness

    @property
    def randomness(self) -> RoundRandomness:
        return self.sampler.randomness

    @property
    def num_examples(self) -> int:
        return self.sampler.num_examples

    @property
    def sample_rate(self) -> float:
        return self.sampler.sample_rate

    def batch(self, step: int) -> torch.Tensor:
        """Step ``step``'s Poisson batch (row indices): each record joins with probability ``sample_rate``."""
        return self.sampler.batch(step)

    def steps_counted(self) -> int:
        """The steps the accountant has recorded so far."""
        return sum(s for _, _, s in self.accountant.history)


def private_training(
    model: torch.nn.Module,
    num_examples: int,
    *,
    accountant: str,
    noise_multiplier: float,
    max_grad_norm: float,
    batch_size: int,
    lr: float,
    momentum: float,
    grad_sample_mode: str,
    randomness: RoundRandomness | None = None,
    sample_rate: float | None = None,
    steps_per_epoch: int | None = None,
    expected_batch_size: float | None = None,
) -> PrivateTraining:
    """Wrap ``model`` for DP-SGD over ``num_examples`` records: Poisson sampling at ``sample_rate`` for
    ``steps_per_epoch`` steps an epoch, clipping to C, noise sigma * C, the noised sum divided by
    ``expected_batch_size`` (q times the declared size). Without them: :func:`sampling_plan` of the count n
    (q = batch / n, ceil(n / batch) steps) and n q (for benchmarks and tools, whose size is public).

    ``randomness`` defaults to a fresh secret key (tests pass a fixed one). Opacus provides the per-sample
    gradients (or fedfuse's flat ones), the clipping and noise (:class:`FiniteRowsDPOptimizer`) and the
    accountant; the batches are fedfuse's own (:meth:`PrivateTraining.batch`), because Opacus's uniform
    sampler takes ``int(1 / q)`` steps per epoch, one too few for some N (92 for 1 / q = 93).
    """
    # flat: the model's parameters become views of one flat parameter with exact per-sample gradients; Opacus
    # treats it as a model that computes its own (grad_sample_mode "no_op") and clips and noises it as usual.
    flat = FlatGradSample(model) if grad_sample_mode == "flat" else None
    module = flat if flat is not None else model
    if sample_rate is None or steps_per_epoch is None or expected_batch_size is None:
        sample_rate, steps_per_epoch = sampling_plan(num_examples, batch_size, 1)  # the count n is public here
        expected_batch_size = sample_rate * num_examples
    try:
        if flat is None:
            ModuleValidator.validate(module, strict=True)
        optimizer = torch.optim.SGD(module.parameters(), lr=lr, momentum=momentum)
        sampler = PoissonSampler(
            num_examples, sample_rate, steps_per_epoch, randomness if randomness is not None else RoundRandomness()
        )
        dp_model = prepare_module(
            module, grad_sample_mode="no_op" if flat is not None else grad_sample_mode, batch_first=True, loss_reduction="mean"
        )
        dp_model.forbid_grad_accumulation()  # one backward per step: a Poisson batch is one logical batch
        # The noised sum is divided by the expected batch of the public plan (q * declared size), never by a
        # function of the private record count (Opacus's make_private would use int(len(dataset) * q)).
        dp_optimizer = FiniteRowsDPOptimizer(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction="mean",
            generator=sampler.randomness.noise_generator(),
            secure_mode=False,
        )
        counter = create_accountant(mechanism=accountant)
        dp_optimizer.attach_step_hook(counter.get_optimizer_hook_fn(sample_rate=sample_rate))
    except BaseException:
        if flat is not None:
            flat.release()
        raise

    def close() -> None:
        try:
            dp_model._close()  # remove Opacus hooks and per-sample gradients
        finally:
            if flat is not None:
                flat.release()  # the model gets its own parameters back

    return PrivateTraining(dp_model, dp_optimizer, counter, close, sampler)


def dp_step(
    private: PrivateTraining,
    data: MultimodalData,
    idx: torch.Tensor,
    *,
    modality_dropout: float,
    step: int,
    augmentation: Augmentation | None = None,
) -> float | None:
    """One DP-SGD step on the Poisson batch ``idx``; its (non-DP) mean loss over its finite rows, None if none.

    A record whose loss is not finite counts zero in the loss, and its per-sample gradient (NaN or inf from
    its own forward pass) is zeroed before clipping by :class:`FiniteRowsDPOptimizer`; the step goes on.
    With ``augmentation``, each record runs as K augmented copies (its own secret draws) whose per-sample
    gradients are averaged into the record's one gradient before clipping: its contribution stays <= C.
    """
    if len(idx) == 0:
        # An empty Poisson batch still takes a step: noise only, and it is accounted. No forward pass (functorch
        # cannot run one on zero rows): every parameter gets zero per-sample gradients of zero rows.
        for p in private.optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        private.optimizer.step()
        private.optimizer.zero_grad(set_to_none=True)
        return None
    inputs, mask, labels = _batch(data, idx)
    mask = private.randomness.hide_modalities(step, idx, mask, modality_dropout, num_examples=private.num_examples)
    inputs, mask, labels, copies = _augment(
        augmentation, private.randomness, step, idx, inputs, mask, labels, num_examples=private.num_examples
    )
    loss, value = _batch_loss(private.model(inputs, mask), labels)
    loss.backward()
    if copies > 1:
        _average_copies(private.optimizer.params, copies)
    private.optimizer.step()
    private.optimizer.zero_grad(set_to_none=True)
    return value


def _augment(
    augmentation: Augmentation | None,
    randomness: RoundRandomness,
    step: int,
    idx: torch.Tensor,
    inputs: dict[str, torch.Tensor],
    mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_examples: int,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, int]:
    """The batch as K augmented copies per record, record-major (B -> B * K rows), and K (1: unchanged)."""
    if augmentation is None or not augmentation.active:
        return inputs, mask, labels, 1
    k = augmentation.multiplicity
    draws = randomness.augmentation_draws(step, idx, copies=k, width=augmentation.width, num_examples=num_examples)
    return augmentation.apply(inputs, draws), mask.repeat_interleave(k, dim=0), labels.repeat_interleave(k), k


def _average_copies(params: list[torch.nn.Parameter], copies: int) -> None:
    """Each record's per-sample gradient := the mean over its K copies' rows (record-major), before clipping."""
    for p in params:
        rows = p.grad_sample
        if not isinstance(rows, torch.Tensor):  # Opacus keeps a list only when gradients accumulate over batches
            raise RuntimeError(
                "augmentation multiplicity needs one per-sample gradient tensor per step; got "
                f"{type(rows).__name__} (accumulated batches are not supported)"
            )
        p.grad_sample = rows.reshape(rows.shape[0] // copies, copies, *rows.shape[1:]).mean(dim=1)  # (B*K, ...) -> (B, ...)


def _train_dp(
    model: MultimodalModel,
    data: MultimodalData,
    history: PrivacyHistory,
    *,
    noise_multiplier: float,
    sample_rate: float,
    max_grad_norm: float,
    local_epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    modality_dropout: float,
    grad_sample_mode: str,
    randomness: RoundRandomness,
    expected_steps: int,
    expected_batch_size: float,
    proximal: Callable[[], None],
    augmentation: Augmentation | None = None,
) -> float:
    private = private_training(
        model,
        len(data),
        accountant=history.accountant,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        batch_size=batch_size,
        lr=lr,
        momentum=momentum,
        grad_sample_mode=grad_sample_mode,
        randomness=randomness,
        sample_rate=sample_rate,
        steps_per_epoch=expected_steps // local_epochs,
        expected_batch_size=expected_batch_size,
    )
    steps = private.sampler.steps(local_epochs)
    if (len(steps), private.sample_rate) != (expected_steps, sample_rate):  # before any data is touched
        private.close()
        raise RuntimeError(
            f"the sampler would take {len(steps)} steps at q = {private.sample_rate}, "
            f"the accountant is charged {expected_steps} at q = {sample_rate}"
        )
    total, batches = 0.0, 0
    model.train()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for step in steps:
                loss = dp_step(
                    private, data, private.batch(step), modality_dropout=modality_dropout, step=step, augmentation=augmentation
                )
                if loss is not None:
                    total, batches = total + loss, batches + 1
                proximal()
    finally:
        private.close()
    counted = private.steps_counted()
    rates = {q for _, q, _ in private.accountant.history}
    if counted != expected_steps or rates != {sample_rate}:  # defence in depth: the accountant saw every step
        raise RuntimeError(
            f"Opacus counted {counted} steps at q in {sorted(rates)}, expected {expected_steps} at q = {sample_rate}"
        )
    _check_finite_params(model)  # decided from the noised parameters only (a DP output)
    return total / max(batches, 1)


def non_private_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: MultimodalData,
    idx: torch.Tensor,
    *,
    modality_dropout: float,
    randomness: RoundRandomness,
    step: int,
    augmentation: Augmentation | None = None,
) -> float | None:
    """One plain SGD step on the batch ``idx``; its mean loss over the finite rows (None if none).

    Rows whose loss is not finite take no part; a step whose gradient is still not finite is skipped. With
    ``augmentation`` the loss is the mean over K augmented copies per record.
    """
    inputs, mask, labels = _batch(data, idx)
    mask = randomness.hide_modalities(step, idx, mask, modality_dropout, num_examples=len(data))
    inputs, mask, labels, _ = _augment(augmentation, randomness, step, idx, inputs, mask, labels, num_examples=len(data))
    loss, value = _batch_loss(model(inputs, mask), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters()):
        optimizer.step()
    return value


def _train_non_private(
    model: MultimodalModel,
    data: MultimodalData,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    momentum: float,
    modality_dropout: float,
    randomness: RoundRandomness,
    snapshot: dict[str, torch.Tensor],
    proximal: Callable[[], None],
    augmentation: Augmentation | None = None,
) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    model.train()
    total, batches, n = 0.0, 0, len(data)
    epoch = 0
    order = randomness.permutation(epoch, n)
    try:
        start = 0
        for step in range(steps):
            if start + batch_size > n:
                epoch, start = epoch + 1, 0
                order = randomness.permutation(epoch, n)
            loss = non_private_step(
                model,
                optimizer,
                data,
                order[start : start + batch_size],
                modality_dropout=modality_dropout,
                randomness=randomness,
                step=step,
                augmentation=augmentation,
            )
            start += batch_size
            if loss is not None:
                total, batches = total + loss, batches + 1
            proximal()
        _check_finite_params(model)
    except BaseException:
        model.load_state_dict(snapshot)
        raise
    return total / max(batches, 1)


def _proximal(model: torch.nn.Module, mu: float, reference: dict[str, torch.Tensor] | None, lr: float) -> Callable[[], None]:
    """FedProx's pull ``w -= lr * mu * (w - w_global)`` on the parameters in ``reference``."""
    if mu <= 0 or not reference:
        return lambda: None
    pairs = [(p, reference[name]) for name, p in model.named_parameters() if name in reference]

    @torch.no_grad()
    def pull() -> None:
        for p, ref in pairs:
            p.sub_(lr * mu * (p - ref))

    return pull


def _check_finite_params(model: torch.nn.Module) -> None:
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise NonFiniteError(f"the trained parameters became non-finite ({bad[:3]}...); the round was discarded")
