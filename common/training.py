"""One round of a client's local training: encoders + head with Opacus DP-SGD.

DP-SGD here means Poisson sampling (each record joins each step with probability q), per-sample
gradient clipping to norm C over *all* of the client's parameters, and Gaussian noise of standard
deviation sigma * C on their sum. q, the number of steps and sigma come from public parameters only:
the site's *declared* training-set size N (never the count of its records), the batch size and the
budgets, so neighbouring datasets get the same mechanism. The noise multiplier sigma is calibrated
once per run, for the client's whole planned participation, against both the run's allowance and
the site's lifetime cap; before any data is touched the round is refused if it would exceed either
(fail closed).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader, TensorDataset

from common.accounting import NoisePlan, PrivacyHistory, calibrate_run, validate_privacy_parameters
from common.config import GRAD_SAMPLE_MODES
from common.data import MultimodalData, hide_modalities
from common.errors import DataError, NonFiniteError, PrivacyParameterError
from common.grad_samplers import FlatGradSample
from common.model import MultimodalModel

log = logging.getLogger(__name__)


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


def fresh_generator() -> torch.Generator:
    """A generator seeded from the operating system's entropy (secure_mode's torchcsprng is not available)."""
    return torch.Generator().manual_seed(secrets.randbits(63))


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


def _check_finite_loss(loss: torch.Tensor, step: int) -> None:
    if not torch.isfinite(loss):
        raise NonFiniteError(
            f"the training loss became {loss.item()} at step {step}; lower the learning rate or check the "
            "data for extreme values. The round's update was discarded."
        )


def train_round(
    model: MultimodalModel,
    data: MultimodalData,
    history: PrivacyHistory,
    *,
    target_epsilon: float,
    delta: float,
    max_grad_norm: float,
    planned_rounds: int,
    local_epochs: int,
    batch_size: int,
    max_epsilon: float | None = None,
    declared_examples: int | None = None,
    run_id: str = "run",
    lr: float = 0.5,
    momentum: float = 0.5,
    modality_dropout: float = 0.0,
    grad_sample_mode: str = "flat",
    generator: torch.Generator | None = None,
    proximal_mu: float = 0.0,
    proximal_reference: dict[str, torch.Tensor] | None = None,
    _noise_scale: float = 1.0,
) -> RoundResult:
    """Train ``model`` (in place) on ``data`` for one round; update ``history`` with the round's mechanism.

    ``target_epsilon`` is the run's allowance (``dp.epsilon``: this run's own mechanisms, composed over
    the run) and ``max_epsilon`` the site's lifetime cap on the whole history (default: the same value).
    ``declared_examples`` is the public training-set size N the mechanism is derived from (default: the
    count of ``data``, for tests and tools whose size is public anyway).

    ``target_epsilon = math.inf`` trains without DP; the round is recorded in the history with noise
    multiplier 0 and its real steps, and the client's epsilon is infinite from then on. A private
    request on such a history is refused (NonPrivateHistoryError). On error the model is restored to
    its state before the round. With ``proximal_mu > 0`` (FedProx) every step
    also pulls the parameters named in ``proximal_reference`` towards it; that pull uses no data, so
    it is applied after the DP step and costs no privacy. ``_noise_scale`` exists for the empirical
    privacy audit's negative test only (it is not reachable from any configuration).
    """
    # Check everything before touching the data.
    validate_privacy_parameters(target_epsilon=target_epsilon, delta=delta, max_grad_norm=max_grad_norm)
    for name, value in (("planned_rounds", planned_rounds), ("local_epochs", local_epochs), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise PrivacyParameterError(f"{name} must be a positive integer, got {value!r}")
    if not 0 <= modality_dropout < 1:
        raise ValueError(f"modality_dropout must lie in [0, 1), got {modality_dropout}")
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode must be one of {list(GRAD_SAMPLE_MODES)}, got '{grad_sample_mode}'")
    max_epsilon = target_epsilon if max_epsilon is None else max_epsilon
    if not (isinstance(max_epsilon, (int, float)) and max_epsilon > 0):
        raise PrivacyParameterError(f"the site's lifetime cap max-epsilon must be > 0, got {max_epsilon!r}")
    if math.isinf(target_epsilon) and not math.isinf(max_epsilon):
        raise PrivacyParameterError(f"a non-private run (ε = inf) needs a site without a cap, not max-epsilon = {max_epsilon:g}")
    check_compatible(model, data)
    n = len(data) if declared_examples is None else declared_examples
    sample_rate, steps = sampling_plan(n, batch_size, local_epochs)
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    start = time.perf_counter()
    model.train()

    if math.isinf(target_epsilon):
        # Charged before the data is touched, like a private round: its data leaves without DP, for good.
        history.record((0.0, sample_rate, steps), run_id=run_id)
        loss = _train_non_private(model, data, steps=steps, batch_size=batch_size, lr=lr, momentum=momentum,
                                  modality_dropout=modality_dropout, generator=generator, snapshot=snapshot,
                                  proximal=_proximal(model, proximal_mu, proximal_reference, lr))
        return RoundResult(False, math.inf, None, None, sample_rate, steps, None, n, loss, time.perf_counter() - start)

    # Refuse a private request on a history that is already non-private, before anything else.
    history.refuse_if_non_private(budget=target_epsilon)
    # Calibrate the noise once per run for the whole planned participation; check both budgets.
    if history.delta is not None and history.delta != delta:
        raise PrivacyParameterError(
            f"delta {delta:g} differs from the delta {history.delta:g} of this client's earlier rounds; "
            "one client's history must use one delta"
        )
    plan_params = dict(run_id=run_id, sample_rate=sample_rate, steps_per_round=steps, planned_rounds=planned_rounds,
                       target_epsilon=target_epsilon, delta=delta, max_grad_norm=max_grad_norm)
    plan = history.plan
    if plan is None or plan.run_id != run_id:
        sigma = calibrate_run(history=history.entries, sample_rate=sample_rate, steps=steps * planned_rounds,
                              run_budget=target_epsilon, lifetime_budget=max_epsilon, delta=delta,
                              accountant=history.accountant)
        plan = NoisePlan(noise_multiplier=sigma, **plan_params)
        log.info("calibrated noise multiplier %.4f for %d rounds x %d steps at q = %.4f", sigma, planned_rounds, steps, sample_rate)
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
        loss = _train_dp(model, data, history, noise_multiplier=plan.noise_multiplier * _noise_scale,
                         sample_rate=sample_rate, max_grad_norm=max_grad_norm, local_epochs=local_epochs,
                         batch_size=batch_size, lr=lr,
                         momentum=momentum, modality_dropout=modality_dropout, grad_sample_mode=grad_sample_mode,
                         generator=generator, expected_steps=steps, expected_batch_size=sample_rate * n,
                         proximal=_proximal(model, proximal_mu, proximal_reference, lr))
    except BaseException:
        model.load_state_dict(snapshot)
        raise
    finally:
        history.record(mechanism, run_id=run_id)
    return RoundResult(True, epsilon_after, delta, plan.noise_multiplier, sample_rate, steps, max_grad_norm, n, loss,
                       time.perf_counter() - start, run_epsilon_after)


@dataclass
class PrivateTraining:
    """Opacus's DP-SGD pieces for one round: call ``model``, step ``optimizer``, draw batches from ``loader``."""

    model: torch.nn.Module
    optimizer: DPOptimizer
    loader: DataLoader
    engine: PrivacyEngine
    close: Callable[[], None]  # removes the per-sample gradient machinery from the client's model

    def batches(self) -> Iterator[torch.Tensor]:
        """One epoch of Poisson batches (row indices) from the loader's own sampler: the batches the loader
        would yield, without its per-row fetch and collate of a dataset of indices (~0.13 ms a step here)."""
        for idx in self.loader.batch_sampler:
            yield torch.as_tensor(idx, dtype=torch.int64)


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
    sample_rate: float | None = None,
    steps_per_epoch: int | None = None,
    expected_batch_size: float | None = None,
) -> PrivateTraining:
    """Wrap ``model`` for DP-SGD over ``num_examples`` records: Poisson sampling at ``sample_rate`` for
    ``steps_per_epoch`` steps an epoch, clipping to C, noise sigma * C, the noised sum divided by
    ``expected_batch_size`` (q times the declared size). Without them: 1 / ceil(N / batch_size), its
    inverse and N q, from the count N (for benchmarks, whose size is public).
    """
    # flat: the model's parameters become views of one flat parameter with exact per-sample gradients; Opacus
    # treats it as a model that computes its own (grad_sample_mode "no_op") and clips and noises it as usual.
    flat = FlatGradSample(model) if grad_sample_mode == "flat" else None
    module = flat if flat is not None else model
    if sample_rate is None or steps_per_epoch is None or expected_batch_size is None:
        steps_per_epoch = math.ceil(num_examples / batch_size)
        sample_rate = 1.0 / steps_per_epoch
        expected_batch_size = num_examples * sample_rate
    try:
        optimizer = torch.optim.SGD(module.parameters(), lr=lr, momentum=momentum)
        # Poisson sampling and noise draw from generators seeded by the OS, never from torch's global RNG,
        # which any code (or a fixed default seed in a fresh process) could make repeat across rounds.
        # The sampler's rate and step count are the public ones given, never derived from the record count.
        sampler = UniformWithReplacementSampler(num_samples=num_examples, sample_rate=sample_rate,
                                                generator=fresh_generator(), steps=steps_per_epoch)
        loader = DataLoader(TensorDataset(torch.arange(num_examples)), batch_sampler=sampler)
        with warnings.catch_warnings():
            # secure_mode needs torchcsprng, which is not available; documented in the README.
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            engine = PrivacyEngine(accountant=accountant)
            dp_model, dp_optimizer, dp_loader = engine.make_private(
                module=module,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=noise_multiplier,
                max_grad_norm=max_grad_norm,
                poisson_sampling=False,  # the loader samples already (Poisson, at the rate given)
                grad_sample_mode="no_op" if flat is not None else grad_sample_mode,
                noise_generator=fresh_generator(),
            )
        # Opacus divides the noised sum by int(len(dataset) * rate), a function of the private record count; the
        # expected batch of the public plan (q * declared size) takes its place.
        dp_optimizer.expected_batch_size = expected_batch_size
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

    return PrivateTraining(dp_model, dp_optimizer, dp_loader, engine, close)


def dp_step(
    private: PrivateTraining,
    data: MultimodalData,
    idx: torch.Tensor,
    *,
    modality_dropout: float,
    generator: torch.Generator | None,
    step: int,
) -> float | None:
    """One DP-SGD step on the Poisson batch ``idx``; its (non-DP) mean loss, None for an empty batch."""
    inputs, mask, labels = _batch(data, idx)
    mask = hide_modalities(mask, modality_dropout, generator)
    # An empty Poisson batch still takes a step: noise only, and it is accounted.
    loss = F.cross_entropy(private.model(inputs, mask), labels)
    value = None
    if len(idx):
        _check_finite_loss(loss, step)
        value = loss.item()
    loss.backward()
    private.optimizer.step()
    private.optimizer.zero_grad(set_to_none=True)
    return value


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
    generator: torch.Generator | None,
    expected_steps: int,
    expected_batch_size: float,
    proximal: "Callable[[], None]",
) -> float:
    private = private_training(model, len(data), accountant=history.accountant, noise_multiplier=noise_multiplier,
                               max_grad_norm=max_grad_norm, batch_size=batch_size, lr=lr, momentum=momentum,
                               grad_sample_mode=grad_sample_mode, sample_rate=sample_rate,
                               steps_per_epoch=expected_steps // local_epochs,
                               expected_batch_size=expected_batch_size)
    total, batches, step = 0.0, 0, 0
    model.train()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for _ in range(local_epochs):
                for idx in private.batches():
                    loss = dp_step(private, data, idx, modality_dropout=modality_dropout, generator=generator, step=step)
                    if loss is not None:
                        total, batches = total + loss, batches + 1
                    proximal()
                    step += 1
    finally:
        private.close()
    counted = sum(s for _, _, s in private.engine.accountant.history)
    if counted != expected_steps:  # defence in depth: the accountant must have seen every step
        raise RuntimeError(f"Opacus counted {counted} steps, expected {expected_steps}")
    _check_finite_params(model)
    return total / max(batches, 1)


def non_private_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: MultimodalData,
    idx: torch.Tensor,
    *,
    modality_dropout: float,
    generator: torch.Generator | None,
    step: int,
) -> float:
    """One plain SGD step on the batch ``idx``; its mean loss."""
    inputs, mask, labels = _batch(data, idx)
    mask = hide_modalities(mask, modality_dropout, generator)
    loss = F.cross_entropy(model(inputs, mask), labels)
    _check_finite_loss(loss, step)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def _train_non_private(
    model: MultimodalModel,
    data: MultimodalData,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    momentum: float,
    modality_dropout: float,
    generator: torch.Generator | None,
    snapshot: dict[str, torch.Tensor],
    proximal: "Callable[[], None]",
) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    model.train()
    total, n = 0.0, len(data)
    order = torch.randperm(n, generator=generator)
    try:
        for step in range(steps):
            start = (step * batch_size) % n
            if start + batch_size > n:
                order = torch.randperm(n, generator=generator)
                start = 0
            total += non_private_step(model, optimizer, data, order[start : start + batch_size],
                                      modality_dropout=modality_dropout, generator=generator, step=step)
            proximal()
        _check_finite_params(model)
    except BaseException:
        model.load_state_dict(snapshot)
        raise
    return total / max(steps, 1)


def _proximal(model: torch.nn.Module, mu: float, reference: dict[str, torch.Tensor] | None, lr: float) -> "Callable[[], None]":
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
        raise NonFiniteError(f"parameters became non-finite after training ({bad[:3]}...); the round was discarded")
