"""Empirical privacy audit: canaries trained through the real DP-SGD path, epsilon lower bound from one run.

One-run audit (Steinke, Nasr, Jagielski, NeurIPS 2023): m canaries are each included in the
training data independently with probability 1/2; after training the auditor scores every canary
and :func:`common.privacy.canary_stats.audit_scores` turns scores and inclusions into an epsilon lower
bound at 95 % confidence. A lower bound above the epsilon the accountant claims means the run was
less private than claimed (e.g. less noise than calibrated): the accounting or the noise is wrong.

How canaries enter :func:`common.privacy.training.train_round` unchanged (its real Poisson sampling,
per-sample clipping over every parameter, calibrated noise, accountant and budget check):

- **An extra modality.** The audit's data is the real (synthetic) samples plus m canary slots.
  Its schema is the real schema plus a ``canary`` tabular modality of width m. Real samples lack
  it (zero-filled, as for any absent modality); a canary slot has only it: the one-hot vector e_i
  for an included canary i, all zeros for an excluded one (a *blank*). Blanks keep the dataset
  size, and so the sampling rate and expected batch, independent of which canaries are included.
- **A canary block real samples never touch.** :class:`CanaryModel` is the real
  :class:`~common.model.multimodal.MultimodalModel`, unchanged, plus ``canary``, a bias-free
  ``Linear(m, 1)`` initialised to zero. A real sample's canary input is zero, so its per-sample
  gradient there is exactly zero; a canary row's output is the canary block's only (the real
  model's logits for it are discarded with ``torch.where``), so its per-sample gradient on every
  real parameter is exactly zero.
- **A fixed gradient direction.** A canary row's logits are ``s * (out - out.detach())`` on one
  class: their value is 0, so the softmax is uniform at every step and the cross-entropy gradient
  on the canary weight is the constant ``-s (1 - 1/K) e_i`` whatever the weights are. With
  ``s = 1000 C`` it is always clipped to exactly norm C (a "Dirac canary"); a blank's gradient is 0.

Why this and not canaries in real parameters: a canary whose gradient shares coordinates with real
data is drowned by them (the notes measured random-coordinate canaries as too weak), and one whose
gradient depends on the weights shrinks as the model learns it. Here each canary is the worst case
DP-SGD must hide: a record whose clipped gradient is a full-norm vector in a direction nothing
else touches.

Scores. :class:`CanaryModel` records the canary weights before every step (its forward runs once
per step), so the auditor sees every iterate, which is what the accountant's epsilon covers (the
final model is a post-processing of them). From consecutive iterates it recovers each step's
noisy gradient on each canary coordinate (undoing SGD momentum), in units of C / expected batch:
``x_t = 1[sampled at t] + N(0, sigma^2)`` for an included canary, ``N(0, sigma^2)`` for an
excluded one. The score is the log-likelihood ratio of "included" under the claimed mechanism,
``sum_t log(1 - q + q exp((2 x_t - 1) / (2 s^2)))`` (Neyman-Pearson optimal against a
Poisson-subsampled Gaussian of noise s). s is the noise the transcript shows, estimated robustly
over all (step, canary) values (1.4826 x median absolute deviation; at most a fraction q/2 of them
carry a canary), so that a run with less noise than claimed is scored with the noise it really
has; it is reported beside the calibrated sigma. A score may use anything but the inclusions, so
the bound stays valid. The final model's alignment with each canary's direction
(``w_T[i] - w_0[i]``) is reported too, for information only: it missed 4 of 9 runs with a quarter
of the noise that the transcript score caught (measurements: docs/ledger-format.md).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from common.config import TrainSection
from common.data import synthetic
from common.data.samples import MultimodalData
from common.data.schema import DatasetSchema, ModalitySpec
from common.errors import PrivacyParameterError
from common.model.multimodal import ModelConfig, MultimodalModel
from common.privacy.accounting import ACCOUNTANTS, PrivacyHistory, validate_privacy_parameters
from common.privacy.canary_stats import audit_scores
from common.privacy.training import DPRequest, LocalTraining, RoundResult, train_round

log = logging.getLogger(__name__)

CANARY_MODALITY = "canary"  # the extra modality that carries canaries; real samples never have it
CANARY_CLASS = 0  # the class a canary row's logits push (any class gives the same gradient norm)
CANARY_GRAD_SCALE = 1000.0  # a canary's gradient norm, in units of C: far above C, so always clipped to C
MIN_SCORE_NOISE = 1e-3  # floor of the noise the score assumes (a run without noise gives 0)


@dataclass(frozen=True)
class EmpiricalAuditConfig:
    """One audit run. Defaults: the setup of the README's measured figures (`fedfuse audit --empirical`), a few
    seconds on one core."""

    epsilon: float = 8.0  # the target epsilon train_round calibrates its noise for (the claim under audit)
    delta: float = 1e-5
    canaries: int = 1000  # m: each included with probability 1/2
    steps: int = 200  # DP-SGD steps (local epochs x steps per epoch)
    sample_rate: float = 0.02  # Poisson sampling rate q; 1/q must be an integer (steps per epoch)
    real_samples: int = 500  # real (synthetic) samples trained alongside the canaries
    max_grad_norm: float = 1.0  # per-sample clipping norm C
    accountant: str = "prv"  # the accountant that calibrates the noise and claims epsilon
    beta: float = 0.05  # 1 - confidence of the lower bound
    seed: int = 0  # canary inclusion, real data and initial weights (never sampling, dropout or noise: OS-seeded)

    def __post_init__(self) -> None:
        validate_privacy_parameters(target_epsilon=self.epsilon, delta=self.delta, max_grad_norm=self.max_grad_norm)
        if not math.isfinite(self.epsilon):
            raise PrivacyParameterError("the empirical audit needs a finite epsilon to audit, got inf")
        for name in ("canaries", "steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise PrivacyParameterError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.real_samples, int) or self.real_samples < 1:
            raise PrivacyParameterError(f"real_samples must be a positive integer, got {self.real_samples!r}")
        if not 0 < self.sample_rate <= 1 or abs(1 / self.sample_rate - round(1 / self.sample_rate)) > 1e-9:
            raise PrivacyParameterError(
                f"sample_rate must be 1/k for a whole number k of steps per epoch (e.g. 0.02 = 1/50), got {self.sample_rate}"
            )
        if self.steps % self.steps_per_epoch:
            raise PrivacyParameterError(
                f"steps ({self.steps}) must be a multiple of the {self.steps_per_epoch} steps per epoch that "
                f"sample_rate {self.sample_rate:g} gives"
            )
        if self.accountant not in ACCOUNTANTS:
            raise PrivacyParameterError(f"accountant must be one of {list(ACCOUNTANTS)}, got '{self.accountant}'")
        if not 0 < self.beta < 1:
            raise PrivacyParameterError(f"beta (1 - confidence) must lie in (0, 1), got {self.beta}")

    @property
    def steps_per_epoch(self) -> int:
        return round(1 / self.sample_rate)


def canary_schema(real: DatasetSchema, num_canaries: int) -> DatasetSchema:
    """``real`` plus the ``canary`` modality, a one-hot vector of width ``num_canaries``."""
    if CANARY_MODALITY in real:
        raise PrivacyParameterError(f"the real schema already has a modality named '{CANARY_MODALITY}'")
    return DatasetSchema((*real.modalities, ModalitySpec(CANARY_MODALITY, "tabular", (num_canaries,))), real.labels)


class CanaryModel(nn.Module):
    """The real MultimodalModel plus a canary block only canary rows reach; records the block before each step."""

    def __init__(self, real_schema: DatasetSchema, config: ModelConfig, num_canaries: int, *, max_grad_norm: float):
        super().__init__()
        self.model = MultimodalModel(real_schema, config)  # the real model, unchanged
        self.schema = canary_schema(real_schema, num_canaries)  # what train_round checks the data against
        self.canary = nn.Linear(num_canaries, 1, bias=False)  # weight (1, m): one coordinate per canary
        nn.init.zeros_(self.canary.weight)
        self.grad_scale = CANARY_GRAD_SCALE * max_grad_norm
        self.trace: list[torch.Tensor] = []  # canary weights (m,) before each forward (one per DP-SGD step)

    def forward(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        # inputs: name -> (B, *shape), canary (B, m); mask: (B, R + 1) bool, the canary column last
        self.trace.append(self.canary.weight.detach()[0].clone())
        names = self.model.schema.names
        real_mask, canary_row = mask[:, : len(names)], mask[:, len(names)]  # (B, R), (B,)
        # Canary rows have no real modality: give them a placeholder (zero input, discarded below) so
        # the real model's masked softmax stays finite.
        placeholder = torch.zeros_like(real_mask)
        placeholder[:, 0] = ~real_mask.any(dim=1)
        logits = self.model({n: inputs[n] for n in names}, real_mask | placeholder)  # (B, K)
        out = self.canary(inputs[CANARY_MODALITY])  # (B, 1); 0 for real rows and blanks
        push = torch.zeros_like(logits)
        push[:, CANARY_CLASS] = 1.0
        canary_logits = self.grad_scale * (out - out.detach()) * push  # (B, K): value 0, fixed gradient
        return torch.where(canary_row.unsqueeze(1), canary_logits, logits)  # (B, K)


def build_audit_data(real: MultimodalData, included: np.ndarray, *, steps_per_epoch: int) -> MultimodalData:
    """Real samples, then one slot per canary (e_i if included, blank if not), then blanks up to steps_per_epoch * B."""
    m = len(included)
    schema = canary_schema(real.schema, m)
    n0 = len(real) + m
    batch = math.ceil(n0 / steps_per_epoch)
    n = steps_per_epoch * batch  # so that train_round's steps per epoch is exactly steps_per_epoch
    extra = n - len(real)
    inputs = {name: torch.cat([x, torch.zeros((extra, *x.shape[1:]), dtype=x.dtype)]) for name, x in real.inputs.items()}
    canary = torch.zeros((n, m))
    rows = len(real) + np.flatnonzero(included)
    canary[torch.as_tensor(rows), torch.as_tensor(np.flatnonzero(included))] = 1.0
    inputs[CANARY_MODALITY] = canary  # (N, m)
    mask = torch.zeros((n, len(schema.names)), dtype=torch.bool)
    mask[: len(real), :-1] = real.mask
    mask[len(real) :, -1] = True  # canary slots and blanks: the canary modality only
    labels = torch.cat([real.labels, torch.full((extra,), CANARY_CLASS, dtype=torch.int64)])
    return MultimodalData(schema, inputs, mask, labels)


def step_gradients(trace: list[torch.Tensor], *, lr: float, momentum: float) -> np.ndarray:
    """Each step's gradient (T, m) from the T + 1 iterates of SGD with momentum (PyTorch's, no dampening)."""
    w = torch.stack(trace).double()  # (T + 1, m)
    buf = (w[:-1] - w[1:]) / lr  # (T, m): momentum buffer used at each step
    grads = buf.clone()
    grads[1:] -= momentum * buf[:-1]
    return grads.numpy()


def canary_units(
    trace: list[torch.Tensor], result: RoundResult, *, lr: float, momentum: float, max_grad_norm: float
) -> np.ndarray:
    """Each step's noisy gradient on each canary coordinate (T, m), in units of C / expected batch, signed so that
    an included canary adds +1 when sampled (its clipped gradient is -C e_i). The expected batch is the one the
    round's optimizer divided the noised sum by: q times the declared size, the float training uses."""
    expected_batch = result.sample_rate * result.num_examples
    return -step_gradients(trace, lr=lr, momentum=momentum) * expected_batch / max_grad_norm


def measured_noise(x: np.ndarray) -> float:
    """Robust standard deviation (1.4826 x median absolute deviation) of all values of x."""
    values = x.ravel()
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def transcript_scores(x: np.ndarray, *, sigma: float, sample_rate: float) -> np.ndarray:
    """Log-likelihood ratio per canary of x (T, m) ~ Bernoulli(q) + N(0, sigma^2) against N(0, sigma^2)."""
    a = (2 * x - 1) / (2 * sigma**2)
    if sample_rate >= 1:
        return a.sum(axis=0)
    return np.logaddexp(math.log1p(-sample_rate), math.log(sample_rate) + a).sum(axis=0)


def run_empirical_audit(config: EmpiricalAuditConfig = EmpiricalAuditConfig()) -> dict[str, Any]:
    """Train canaries + real data with train_round at ``config.epsilon``; return the lower bound beside the claim."""
    start = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    included = rng.random(config.canaries) < 0.5
    train = TrainSection()  # the project's default training hyperparameters
    real = synthetic.generate(config.real_samples, seed=config.seed)
    data = build_audit_data(real, included, steps_per_epoch=config.steps_per_epoch)
    with torch.random.fork_rng(devices=[]):  # seeded initial weights without touching the global RNG
        torch.manual_seed(config.seed)
        model = CanaryModel(real.schema, ModelConfig(), config.canaries, max_grad_norm=config.max_grad_norm)
    batch_size = len(data) // config.steps_per_epoch
    history = PrivacyHistory(accountant=config.accountant)
    result = train_round(
        model,  # type: ignore[arg-type]  # a MultimodalModel plus the canary block
        data,
        history,
        dp=DPRequest(config.epsilon, config.delta, config.max_grad_norm, planned_rounds=1),
        training=LocalTraining(
            local_epochs=config.steps // config.steps_per_epoch,
            batch_size=batch_size,
            lr=train.lr,
            momentum=train.momentum,
            modality_dropout=train.modality_dropout,
            grad_sample_mode=train.grad_sample_mode,
        ),
        run_id="empirical-audit",
    )
    trace = model.trace + [model.canary.weight.detach()[0].clone()]
    if result.steps != config.steps or len(trace) != config.steps + 1:
        raise RuntimeError(f"expected {config.steps} steps, train_round took {result.steps} ({len(trace) - 1} forwards)")
    x = canary_units(trace, result, lr=train.lr, momentum=train.momentum, max_grad_norm=config.max_grad_norm)
    sigma, measured = float(result.noise_multiplier), measured_noise(x)
    scores = transcript_scores(x, sigma=max(measured, MIN_SCORE_NOISE), sample_rate=result.sample_rate)
    audit = audit_scores(scores, included, delta=config.delta, beta=config.beta)
    final = audit_scores((trace[-1] - trace[0]).double().numpy(), included, delta=config.delta, beta=config.beta)
    claimed = float(result.epsilon)
    passed = audit["epsilon_lb"] <= claimed
    report = {
        "passed": passed,
        "claimed_epsilon": claimed,
        "target_epsilon": config.epsilon,
        "delta": config.delta,
        "epsilon_lb": audit["epsilon_lb"],
        "confidence": 1 - config.beta,
        "epsilon_lb_final_model": final["epsilon_lb"],
        "guesses": {k: audit[k] for k in ("k_plus", "k_minus", "num_guesses", "num_correct")},
        "num_canaries": config.canaries,
        "num_included": int(included.sum()),
        "real_samples": config.real_samples,
        "dataset_size": len(data),
        "noise_multiplier": sigma,
        "measured_noise_multiplier": measured,
        "sample_rate": result.sample_rate,
        "steps": result.steps,
        "expected_batch_size": result.sample_rate * result.num_examples,  # the optimizer's divisor (float)
        "max_grad_norm": config.max_grad_norm,
        "accountant": config.accountant,
        "seed": config.seed,
        "seconds": round(time.perf_counter() - start, 3),
        "config": asdict(config),
    }
    log.info(
        "empirical audit: claimed ε = %.3f, lower bound %.3f (%s)", claimed, audit["epsilon_lb"], "passed" if passed else "FAILED"
    )
    return report


def format_empirical_report(report: dict[str, Any]) -> str:
    """The audit as text: what was trained, the claim, the lower bound, the verdict."""
    g = report["guesses"]
    guess = f"top {g['k_plus']}" + (f" and bottom {g['k_minus']}" if g["k_minus"] else "")
    lines = [
        "empirical privacy audit: one run with canaries (Steinke, Nasr, Jagielski 2023) through "
        "common.privacy.training.train_round",
        f"  canaries        {report['num_canaries']} ({report['num_included']} included, each with probability 1/2), "
        f"beside {report['real_samples']} real samples",
        f"  DP-SGD          {report['steps']} steps, Poisson q = {report['sample_rate']:g} (expected batch "
        f"{report['expected_batch_size']:.6g}), C = {report['max_grad_norm']:g}, σ = {report['noise_multiplier']:.4f} "
        f"({report['accountant']} calibration for ε = {report['target_epsilon']:g}); the iterates show "
        f"σ ≈ {report['measured_noise_multiplier']:.4f}",
        f"  claimed         (ε = {report['claimed_epsilon']:.3f}, δ = {report['delta']:g})",
        f"  lower bound     ε ≥ {report['epsilon_lb']:.3f} at {report['confidence']:.0%} confidence "
        f"({guess} scores guessed 'in': {g['num_correct']} of {g['num_guesses']} right)",
        f"  final model     ε ≥ {report['epsilon_lb_final_model']:.3f} from the final weights alone (information only)",
        f"  time            {report['seconds']:.1f} s, seed {report['seed']} (sampling, dropout and noise are OS-seeded)",
    ]
    if report["passed"]:
        lines.append("result: passed (the lower bound does not exceed the claimed ε)")
    else:
        lines.append(
            f"result: FAILED: the lower bound ε ≥ {report['epsilon_lb']:.3f} exceeds the claimed "
            f"ε = {report['claimed_epsilon']:.3f}: training leaks more than its accounting says (check the "
            "noise, clipping and sampling in common/privacy/training.py)"
        )
    return "\n".join(lines)
