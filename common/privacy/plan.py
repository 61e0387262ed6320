"""Planning a private run from public parameters only: the noise each site will get, and whether it drowns the signal.

Inputs are what a run config and each site's training-set size say (n, budget ε, δ, batch size, rounds,
local epochs, clipping norm C, the model's parameter counts); no record is read. The sampling rate and the
steps are the training loop's own (:func:`common.privacy.training.sampling_plan`: q = batch / n and ⌈n / batch⌉ steps
per local epoch, n the site's declared size), and the noise multiplier σ is the site's own calibration
(:func:`common.privacy.accounting.calibrate_run`, as ``train_round`` calls it before a fresh site's first round of a
run, with the run's allowance and the lifetime cap both equal to the site's budget, as in a simulation).

Noise-to-signal ratio (NSR), with B = q·n the expected batch, T = local steps per round, d the number of
parameters concerned. Each DP-SGD step adds Gaussian noise of norm about σ·C·√d to a sum of B clipped
per-sample gradients of norm at most B·C, so

    per step:                     NSR_step  = σ·√d / B
    a site's update over a round: NSR_round = σ·√d / (B·√T)     (noise adds up as √T, the signal at most as T)
    the aggregated head:          NSR_head  = √d_head · √(Σ_k w_k²·T_k·σ_k²/B_k²) / Σ_k w_k·T_k,  w_k = n_k / Σ n

The signal is the best case (every clipped gradient of norm C, all in one direction): real gradients
agree less, so the real ratio is larger. The figures compare settings; they do not predict accuracy.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from common.config import RunConfig
from common.errors import BudgetExhaustedError
from common.privacy.accounting import calibrate_run
from common.privacy.training import sampling_plan

# A site's per-round NSR above this is flagged. Set between measured runs (README, Data): HAPT's 21 training
# subjects (228-331 windows each), simulations/scenarios/hapt.toml (batch 64, 12 rounds, 2 epochs): the worst
# site's NSR/round is 2.1 at ε = 8 and 4.6 at ε = 3, which learn (macro-F1 80 and 76), and 12.0 at ε = 1,
# which does not (35). One dataset's runs: a rule of thumb, not a guarantee.
DROWNING = 6.0
RANKING_ACCOUNTANT = "rdp"  # settings are compared with RDP's calibration: fast, and its σ is at least PRV's


@dataclass(frozen=True)
class Setting:
    """The run-config keys the plan varies: train.batch-size, num-server-rounds, train.local-epochs; and the rounds
    each site plans to train in (the server's announced plan, :meth:`common.config.ServerConfig.planned_rounds`)."""

    batch_size: int
    rounds: int
    local_epochs: int
    participation: int = 0  # rounds each site trains in and calibrates its noise for (0 = every round)

    @property
    def trained_rounds(self) -> int:
        """The rounds a site's noise is calibrated for."""
        return min(self.participation, self.rounds) if self.participation else self.rounds

    def __str__(self) -> str:
        each = f" ({self.trained_rounds} per site)" if self.trained_rounds < self.rounds else ""
        return f"batch {self.batch_size}, {self.rounds} rounds{each}, {self.local_epochs} epoch(s)"


def configured_setting(config: RunConfig, rounds: int | None = None, batch_size: int | None = None) -> Setting:
    """The run's setting (or one with other ``rounds`` / ``batch_size``), participation planned as the server plans it."""
    rounds = config.server.num_server_rounds if rounds is None else rounds
    return Setting(
        config.train.batch_size if batch_size is None else batch_size,
        rounds,
        config.train.local_epochs,
        config.server.planned_rounds(rounds),
    )


@dataclass(frozen=True)
class SitePlan:
    """One site under one setting."""

    site: str
    n: int  # training examples (public: the site releases it as its weight)
    params: int  # parameters the site trains (its encoders + its head blocks)
    sample_rate: float
    expected_batch: float
    steps_per_round: int
    noise_multiplier: float | None  # None: non-private (ε = inf); inf: the budget cannot be met
    nsr_step: float
    nsr_round: float

    @property
    def drowned(self) -> bool:
        return self.nsr_round > DROWNING


@dataclass(frozen=True)
class Plan:
    """Every site under one setting, and the aggregated head."""

    setting: Setting
    sites: tuple[SitePlan, ...]
    head_params: int
    nsr_head: float  # per round

    @property
    def drowned(self) -> list[str]:
        return [s.site for s in self.sites if s.drowned]


@functools.lru_cache(maxsize=4096)
def noise_multiplier(*, sample_rate: float, steps: int, epsilon: float, delta: float, accountant: str) -> float:
    """σ a fresh site calibrates for ``steps`` steps in total at ``sample_rate`` (inf: none fits)."""
    if math.isinf(epsilon):
        return 0.0
    try:
        return calibrate_run(
            history=[],
            sample_rate=sample_rate,
            steps=steps,
            run_budget=epsilon,
            lifetime_budget=epsilon,
            delta=delta,
            accountant=accountant,
        )
    except BudgetExhaustedError:
        return math.inf


def plan_site(
    site: str, n: int, params: int, setting: Setting, *, epsilon: float, delta: float, accountant: str = "prv"
) -> SitePlan:
    """σ and the noise-to-signal ratios of one site under ``setting`` (see the module docstring)."""
    q, steps = sampling_plan(n, setting.batch_size, setting.local_epochs)
    sigma = noise_multiplier(
        sample_rate=q, steps=steps * setting.trained_rounds, epsilon=epsilon, delta=delta, accountant=accountant
    )
    b = q * n
    nsr_step = sigma * math.sqrt(params) / b
    return SitePlan(site, n, params, q, b, steps, None if math.isinf(epsilon) else sigma, nsr_step, nsr_step / math.sqrt(steps))


def plan(
    sites: dict[str, tuple[int, int]],
    head_params: int,
    setting: Setting,
    *,
    epsilon: float | dict[str, float],
    delta: float,
    accountant: str = "prv",
) -> Plan:
    """Every site (name -> (n, parameters)) under ``setting``; ``epsilon`` per site or one for all."""
    budget = epsilon if isinstance(epsilon, dict) else {s: epsilon for s in sites}
    rows = tuple(
        plan_site(s, n, p, setting, epsilon=budget[s], delta=delta, accountant=accountant) for s, (n, p) in sites.items()
    )
    total = sum(r.n for r in rows)
    weights = [r.n / total for r in rows]
    noise = sum(w * w * r.steps_per_round * ((r.noise_multiplier or 0.0) / r.expected_batch) ** 2 for w, r in zip(weights, rows))
    signal = sum(w * r.steps_per_round for w, r in zip(weights, rows))
    return Plan(setting, rows, head_params, math.sqrt(head_params) * math.sqrt(noise) / signal)


def candidates(base: Setting, largest_n: int, config: RunConfig | None = None) -> list[Setting]:
    """Settings worth comparing with ``base``: batch sizes around it, and fewer rounds with more epochs; with
    ``config``, each with the participation its server would plan for it (else every round)."""
    batches = sorted({b for b in (16, 32, 64, 128, 256, 512, base.batch_size) if b <= max(largest_n, base.batch_size)})
    rounds = sorted({max(1, base.rounds // k) for k in (1, 2, 4)}, reverse=True)
    planned = (lambda r: config.server.planned_rounds(r)) if config is not None else (lambda r: 0)
    out = [Setting(b, r, base.local_epochs, planned(r)) for b in batches for r in rounds]
    return [base] + [s for s in out if s != base]


def best(plans: list[Plan]) -> Plan:
    """The plan whose worst site has the smallest per-round NSR (ties: the smaller head NSR)."""
    return min(plans, key=lambda p: (max(s.nsr_round for s in p.sites), p.nsr_head))


def suggest(plans: list[Plan], base: Setting) -> Plan:
    """The best batch size at the configured rounds; fewer rounds only if that still drowns a site.

    Fewer rounds always lower the per-round ratio (less noise per step) but also train less, so they
    are suggested only when the configured number of rounds cannot be made to work.
    """
    same = [p for p in plans if p.setting.rounds == base.rounds and p.setting.local_epochs == base.local_epochs]
    pick = best(same) if same else best(plans)
    return best(plans) if pick.drowned else pick


def federation_sizes(config: RunConfig) -> tuple[dict[str, tuple[int, int]], dict[str, float], int]:
    """Per client: (training examples, parameters it trains); its budget; the head's parameter count."""
    from common.data.partition import client_partition, federation_space, num_clients
    from common.model.multimodal import MultimodalModel, global_head_template

    model_config = config.model
    sites, budgets = {}, {}
    for index in range(num_clients(config)):
        part = client_partition(config, index)
        params = sum(p.numel() for p in MultimodalModel(part.train.schema, model_config).parameters())
        sites[part.client_id], budgets[part.client_id] = (len(part.train), params), part.budget
    modalities, labels = federation_space(config)
    head = sum(t.numel() for t in global_head_template(modalities, len(labels), model_config).values())
    return sites, budgets, head


def drowning_warning(config: RunConfig) -> str | None:
    """A warning for the start of a run whose configured setting drowns a site's signal (None: it does not)."""
    if math.isinf(config.dp.epsilon) and not config.dp.group_budgets:
        return None
    sites, budgets, head = federation_sizes(config)
    base = configured_setting(config)
    p = plan(sites, head, base, epsilon=budgets, delta=config.dp.delta, accountant=RANKING_ACCOUNTANT)
    if not p.drowned:
        return None
    worst = max(p.sites, key=lambda s: s.nsr_round)
    return (
        f"the privacy noise will drown the signal at {len(p.drowned)} of {len(p.sites)} site(s): at {worst.site} "
        f"(n = {worst.n}) σ = {worst.noise_multiplier:.2f} and the noise-to-signal ratio of a round's update is "
        f"{worst.nsr_round:.3g} (> {DROWNING:g}). Expect chance-level accuracy; `fedfuse plan` suggests a "
        "batch size and number of rounds"
    )
