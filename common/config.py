"""The run configuration: one typed, frozen object parsed and validated once from Flower's run config.

Flower hands the apps a flat dict (``"train.local-epochs": 1``); :func:`parse_run_config` maps each
key to a field (``train`` section, ``local_epochs``), checks its type and value, and names the key
in every error. Top-level keys belong to :class:`ServerConfig`. The defaults here are the
defaults of ``[tool.flwr.app.config]`` in pyproject.toml (a test keeps them equal).

Site facts in a deployment (data location, state folder, the site's own privacy budget) come
from the SuperNode's node config, never from here: see ``client/site.py``.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from common.errors import ConfigError

# Per-sample gradient engines. flat: exact per-sample gradients of all parameters in one buffer
# (common/privacy/grad_samplers.py), clipped and noised by Opacus's own DPOptimizer, fastest here (`fedfuse bench
# dp-overhead`); hooks, functorch: Opacus's engines (its expanded-weights mode cannot take this model's dict of inputs).
GRAD_SAMPLE_MODES = ("flat", "hooks", "functorch")
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi")
ACCOUNTANTS = ("prv", "rdp")  # Opacus's PRV (the default) and RDP over integer orders: common/privacy/accounting.py
ENCODER_MODES = ("local", "federated")
LR_SCHEDULES = ("constant", "cosine")
ASSIGNMENTS = ("auto", "all", "groups", "dropout")
AUTO = "auto"  # data.assignment / data.missing-rate: synthetic data gets the simulated federation, site folders stay as they are
# participation = 0 with fraction-train < 1: plan a quarter more rounds than a client's expected share, so that
# sampling among the clients still under their plan rarely runs short of clients in the last rounds
PARTICIPATION_SLACK = 1.25
SYNTHETIC_MISSING_RATE = 0.1  # data.missing-rate = "auto" on the synthetic dataset


def _fail(key: str, message: str) -> None:
    raise ConfigError(f"run config key '{key}': {message}")


@dataclass(frozen=True)
class ServerConfig:
    num_server_rounds: int = 10  # rounds of federated training
    strategy: str = "fedavg"  # server optimiser: fedavg | fedprox | fedadam | fedyogi
    fraction_train: float = 1.0  # fraction of available clients sampled to train each round
    participation: int = 0  # rounds each client plans to train in (noise calibrated for them); 0 = auto (planned_rounds)
    fraction_evaluate: float = 1.0  # fraction sampled to evaluate each round
    min_clients: int = 2  # never start a round with fewer available clients
    encoders: str = "local"  # local: encoders never leave a site | federated: averaged per modality
    server_lr: float = 0.05  # FedAdam's / FedYogi's server learning rate (eta)
    proximal_mu: float = 0.01  # FedProx's proximal weight (clients pull towards the global head)
    round_timeout: float = 600.0  # seconds the server waits for replies in a message phase, and for min-clients sites
    evaluate_every: int = 1  # clients evaluate every k-th round (and always in the last): fewer message phases
    ema_decay: float = (
        0.0  # > 0: evaluate, checkpoint and serve the EMA of the global parameters (clients train from the raw ones)
    )
    seed: int = 0  # partitioning, initial weights, non-private rounds' shuffling and dropout (DP rounds: OS-seeded)
    out_dir: str = ""  # run output folder ("" = ./runs/<flower run id>)

    def __post_init__(self) -> None:
        if self.num_server_rounds < 1:
            _fail("num-server-rounds", "must be >= 1")
        if self.strategy not in STRATEGIES:
            _fail("strategy", f"must be one of {list(STRATEGIES)}, got '{self.strategy}'")
        if not 0 < self.fraction_train <= 1:
            _fail("fraction-train", "must lie in (0, 1]")
        if not 0 <= self.participation <= self.num_server_rounds:
            _fail(
                "participation",
                f"must lie in [0, num-server-rounds = {self.num_server_rounds}] (0 = auto), got {self.participation}",
            )
        if not 0 <= self.fraction_evaluate <= 1:
            _fail("fraction-evaluate", "must lie in [0, 1]")
        if self.min_clients < 1:
            _fail("min-clients", "must be >= 1")
        if self.encoders not in ENCODER_MODES:
            _fail("encoders", f"must be one of {list(ENCODER_MODES)}, got '{self.encoders}'")
        if self.server_lr <= 0:
            _fail("server-lr", "must be > 0")
        if self.proximal_mu < 0:
            _fail("proximal-mu", "must be >= 0")
        if self.round_timeout <= 0:
            _fail("round-timeout", "must be > 0")
        if self.evaluate_every < 1:
            _fail("evaluate-every", "must be >= 1 (1 = every round; the last round always evaluates)")
        if not 0 <= self.ema_decay < 1:
            _fail("ema-decay", f"must lie in [0, 1) (0 = off; e.g. 0.9 averages over about 10 rounds), got {self.ema_decay}")

    def planned_rounds(self, total: int | None = None) -> int:
        """The rounds each client plans to train in, of ``total`` (default num-server-rounds): ``participation``,
        or (auto) every round with fraction-train = 1, else ceil(PARTICIPATION_SLACK x rounds x fraction-train).
        Public: the server announces it in every train message, a client calibrates its noise for it, and no
        client is sampled beyond it."""
        total = self.num_server_rounds if total is None else total
        if self.participation:
            return min(self.participation, total)
        if self.fraction_train >= 1:
            return total
        return min(total, math.ceil(PARTICIPATION_SLACK * total * self.fraction_train))


# Keys with a value per modality. Flower's run config accepts only the keys pyproject.toml declares, so each is
# ONE string of "modality=value" pairs (model.encoder = "acc=lstm, img=mypkg.encoders:small_cnn"); fedfuse's own
# scenarios and --set also take one key per modality (model.encoder.acc = "lstm"), merged into that string.
PER_MODALITY = ("model.encoder", "model.init")
_MODALITY = re.compile(r"^[a-z][a-z0-9_]{0,31}$")  # as in common/data/schema.py


def _per_modality(key: str, value: str) -> dict[str, str]:
    """``"a=x, b=y"`` (or ``"a=x; b=y"``, as model.transforms separates modalities) as ``{"a": "x", "b": "y"}``;
    ConfigError naming ``key`` when malformed."""
    out: dict[str, str] = {}
    for item in (i.strip() for i in re.split(r"[,;]", value)):
        if not item:
            continue
        name, sep, choice = (part.strip() for part in item.partition("="))
        if not sep or not _MODALITY.match(name) or not choice:
            _fail(key, f'expected "modality=value" pairs separated by commas or semicolons, got {item!r}')
        if name in out:
            _fail(key, f"modality '{name}' is named twice")
        out[name] = choice
    return out


def _join(pairs: Mapping[str, str]) -> str:
    return ",".join(f"{name}={choice}" for name, choice in sorted(pairs.items()))


@dataclass(frozen=True)
class ModelConfig:
    """The architecture shared by the whole federation (the head must match on every client)."""

    fusion: str = "attention"  # attention | concat | late
    embed_dim: int = 32  # shared embedding size
    hidden_dim: int = 32  # head width
    transforms: str = ""  # per-record input transforms per modality, e.g. "acc=gravity+magnitude;gyro=magnitude"
    # per modality "acc=lstm, img=pkg.module:factory": a built-in encoder or an encoder factory (common/model/encoders.py)
    encoder: str = ""
    # per modality "img=FILE": a safetensors file of encoder weights that fresh encoders start from (fedfuse pretrain)
    init: str = ""
    norm: str = "none"  # built-in CNN encoders (image, signal): none | group | layer, after each convolution (never BatchNorm)
    width: int = 0  # built-in CNN encoders: convolution channels (0 = their defaults: image 16 and 32, signal 32)

    def __post_init__(self) -> None:
        # here, not at import: these import torch (`fedfuse --help` stays fast)
        from common.model.fusion import FUSIONS
        from common.model.transforms import parse_transforms

        if self.fusion not in FUSIONS:
            _fail("model.fusion", f"must be one of {list(FUSIONS)}, got '{self.fusion}'")
        parse_transforms(self.transforms)  # ConfigError naming the transform or the malformed chain
        if self.embed_dim < 1 or self.hidden_dim < 1:
            _fail("model.embed-dim" if self.embed_dim < 1 else "model.hidden-dim", "must be >= 1")
        from common.model.encoders import NORMS, check_choice

        if self.norm not in NORMS:
            _fail(
                "model.norm", f"must be one of {list(NORMS)} (per-sample normalisations; BatchNorm breaks DP), got '{self.norm}'"
            )
        if self.width < 0:
            _fail("model.width", "must be >= 0 (0 = the built-in encoders' default channels)")

        for modality, choice in self.encoders.items():
            check_choice(modality, choice)
        object.__setattr__(self, "encoder", _join(self.encoders))  # one canonical spelling
        object.__setattr__(self, "init", _join(self.inits))

    @property
    def encoders(self) -> dict[str, str]:
        """Modality -> the encoder the run config names (modalities not named get their kind's default)."""
        return _per_modality("model.encoder", self.encoder)

    @property
    def inits(self) -> dict[str, str]:
        """Modality -> the safetensors file its fresh encoder starts from."""
        return _per_modality("model.init", self.init)

    def encoder_for(self, modality: str) -> str:
        """The encoder choice for ``modality`` (``"default"``: its kind's)."""
        return self.encoders.get(modality, "default")


@dataclass(frozen=True)
class TrainSection:
    local_epochs: int = 1  # passes over the local data per round
    batch_size: int = 64  # expected Poisson batch size is at most this
    lr: float = 0.5  # client learning rate (SGD)
    lr_schedule: str = "constant"  # constant | cosine: lr decays over the run's rounds to a tenth (public: the round number)
    momentum: float = 0.5
    modality_dropout: float = 0.3  # hide each present modality with this probability while training
    grad_sample_mode: str = (
        "flat"  # per-sample gradients: flat (common/privacy/grad_samplers.py, fastest) | Opacus's hooks | functorch
    )
    augmentations: str = ""  # per-record augmentation groups, e.g. "acc+gyro=rotate(15)" (common/privacy/augmentation.py)
    multiplicity: int = 1  # augmented copies per record, averaged inside its gradient before clipping

    def __post_init__(self) -> None:
        if self.local_epochs < 1:
            _fail("train.local-epochs", "must be >= 1")
        if self.batch_size < 1:
            _fail("train.batch-size", "must be >= 1")
        if self.lr_schedule not in LR_SCHEDULES:
            _fail("train.lr-schedule", f"must be one of {list(LR_SCHEDULES)}, got '{self.lr_schedule}'")
        if self.lr <= 0:
            _fail("train.lr", "must be > 0")
        if not 0 <= self.momentum < 1:
            _fail("train.momentum", "must lie in [0, 1)")
        if not 0 <= self.modality_dropout < 1:
            _fail("train.modality-dropout", "must lie in [0, 1)")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            _fail("train.grad-sample-mode", f"must be one of {list(GRAD_SAMPLE_MODES)}")
        if self.multiplicity < 1:
            _fail("train.multiplicity", "must be >= 1")
        from common.privacy.augmentation import parse_augmentations  # imports torch: not at import

        parse_augmentations(self.augmentations, self.multiplicity)  # ConfigError saying what to write


@dataclass(frozen=True)
class DPSection:
    # The run's allowance per site: the epsilon of this run's own mechanisms, composed over the run. A deployed
    # site's lifetime cap (node config max-epsilon) bounds its whole history as well; in simulation both are this
    # value. inf = non-private (the site's epsilon is infinite from then on).
    epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0  # per-sample clipping norm C
    accountant: str = "prv"  # prv | rdp
    group_epsilon: str = ""  # simulation: per-group budgets, e.g. "8,4,1" (groups as in data.groups)

    def __post_init__(self) -> None:
        if math.isnan(self.epsilon) or self.epsilon <= 0:
            _fail("dp.epsilon", f"must be > 0 (inf for non-private), got {self.epsilon}")
        if not 0 < self.delta < 1:
            _fail("dp.delta", f"must lie in (0, 1), got {self.delta}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            _fail("dp.max-grad-norm", "must be a positive number")
        if self.accountant not in ACCOUNTANTS:
            _fail("dp.accountant", f"must be {' or '.join(map(repr, ACCOUNTANTS))}, got '{self.accountant}'")
        for value in self.group_budgets:
            if math.isnan(value) or value <= 0:
                _fail("dp.group-epsilon", f"budgets must be > 0, got {value}")

    @property
    def group_budgets(self) -> tuple[float, ...]:
        try:
            return tuple(float(v) for v in self.group_epsilon.split(",") if v.strip())
        except ValueError:
            _fail("dp.group-epsilon", f"expected comma-separated numbers, got '{self.group_epsilon}'")
            raise  # unreachable


@dataclass(frozen=True)
class DataSection:
    dataset: str = "synthetic"  # "synthetic" or a folder of site folders (one per client)
    num_clients: int = 6  # synthetic only; a folder has one client per site
    samples_per_client: int = 1200  # synthetic only
    test_fraction: float = 0.2  # synthetic only: held-out part of each client's samples
    assignment: str = AUTO  # auto (synthetic: groups; site folders: all) | all | groups | dropout (FedMultimodal)
    groups: str = "image+signal+tabular;image+signal;signal+tabular;image+tabular;image;tabular"
    modality_drop_prob: float = 0.0  # p for assignment = dropout
    missing_rate: float | str = AUTO  # per sample: hide each held modality w.p. this; auto = 0.1 synthetic, 0 site folders
    dirichlet_alpha: float = 0.0  # label skew across clients (0 = none, smaller = more skew)
    server_test: str = ""  # folder whose test-only sites the server evaluates the global model on (encoders = federated)

    def __post_init__(self) -> None:
        if not self.dataset:
            _fail("data.dataset", "must be 'synthetic' or a folder of site folders")
        if self.num_clients < 1:
            _fail("data.num-clients", "must be >= 1")
        if self.samples_per_client < 2:
            _fail("data.samples-per-client", "must be >= 2")
        if not 0 <= self.test_fraction < 1:
            _fail("data.test-fraction", "must lie in [0, 1)")
        if self.assignment not in ASSIGNMENTS:
            _fail("data.assignment", f"must be one of {list(ASSIGNMENTS)}, got '{self.assignment}'")
        if self.assignment in ("groups", AUTO) and not self.group_list:
            _fail("data.groups", "needs at least one group, e.g. 'image;signal;image+signal'")
        if not 0 <= self.modality_drop_prob < 1:
            _fail("data.modality-drop-prob", "must lie in [0, 1)")
        if self.missing_rate != AUTO and not (isinstance(self.missing_rate, float) and 0 <= self.missing_rate < 1):
            _fail("data.missing-rate", f'must lie in [0, 1) or be "{AUTO}", got {self.missing_rate!r}')
        if self.dirichlet_alpha < 0:
            _fail("data.dirichlet-alpha", "must be >= 0 (0 = no label skew)")

    @property
    def synthetic(self) -> bool:
        return self.dataset == "synthetic"

    @property
    def effective_assignment(self) -> str:
        """The assignment in force: ``auto`` is ``groups`` on synthetic data and ``all`` on site folders."""
        if self.assignment != AUTO:
            return self.assignment
        return "groups" if self.synthetic else "all"

    @property
    def effective_missing_rate(self) -> float:
        """The per-sample missing rate in force: ``auto`` is 0.1 on synthetic data and 0 on site folders."""
        if self.missing_rate == AUTO:
            return SYNTHETIC_MISSING_RATE if self.synthetic else 0.0
        return float(self.missing_rate)

    @property
    def group_list(self) -> tuple[tuple[str, ...], ...]:
        return tuple(tuple(m.strip() for m in g.split("+") if m.strip()) for g in self.groups.split(";") if g.strip())


@dataclass(frozen=True)
class ReleaseSection:
    """What clients send beyond the head. Each item is computed on private data WITHOUT DP."""

    train_metrics: bool = False  # training loss of the round
    eval_metrics: bool = True  # held-out accuracy / macro-F1 / loss, overall and per modality subset


@dataclass(frozen=True)
class FederationSection:
    """The head's input space when the server cannot derive it from a dataset (deployments)."""

    modalities: str = ""  # e.g. "acc,gyro" ("" = from data.dataset)
    labels: str = ""  # e.g. "walk,sit,stand" ("" = from data.dataset)


@dataclass(frozen=True)
class SecAggSection:
    """Secure aggregation of the head with Flower's SecAgg+ (README, Secure aggregation)."""

    enabled: bool = False  # the server learns only the sum of the sites' head updates
    num_shares: float = 1.0  # fraction of a round's clients each client secret-shares its keys with
    reconstruction_threshold: float = 0.67  # fraction of those shares needed to unmask (the rest may drop out)
    clipping_range: float = 8.0  # bound on each coordinate of a client's weighted head change (else it fails)
    max_weight: int = 10000  # the most training examples a site may have (its weight is n / max-weight)

    def __post_init__(self) -> None:
        if not 0 < self.num_shares <= 1:
            _fail("secagg.num-shares", "must lie in (0, 1] (a fraction of the round's clients)")
        if not 0 < self.reconstruction_threshold <= 1:
            _fail("secagg.reconstruction-threshold", "must lie in (0, 1] (a fraction of the shares)")
        if not (math.isfinite(self.clipping_range) and self.clipping_range >= 1):
            _fail("secagg.clipping-range", "must be a number >= 1")
        if self.max_weight < 1:
            _fail("secagg.max-weight", "must be >= 1")


@dataclass(frozen=True)
class RunConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainSection = field(default_factory=TrainSection)
    dp: DPSection = field(default_factory=DPSection)
    data: DataSection = field(default_factory=DataSection)
    release: ReleaseSection = field(default_factory=ReleaseSection)
    federation: FederationSection = field(default_factory=FederationSection)
    secagg: SecAggSection = field(default_factory=SecAggSection)

    def __post_init__(self) -> None:
        if self.data.server_test and self.server.encoders != "federated":
            _fail("data.server-test", 'server-side evaluation needs a whole global model: set encoders = "federated"')
        if self.secagg.enabled and self.server.encoders == "federated":
            _fail(
                "secagg.enabled",
                "secure aggregation sums one vector whose layout every site must know before the "
                "round; federated encoders are sized by each site's data schema, which the server and the other "
                'sites do not know. Set encoders = "local" or turn secure aggregation off',
            )
        if self.secagg.enabled and self.server.min_clients < 2:
            _fail("secagg.enabled", "secure aggregation needs at least 2 clients per round: set min-clients >= 2")

    def to_flat(self) -> dict[str, Any]:
        """The flat, kebab-case run config (what Flower passes around)."""
        flat: dict[str, Any] = {}
        for section in fields(self):
            obj = getattr(self, section.name)
            prefix = "" if section.name == "server" else f"{section.name}."
            for f in fields(obj):
                flat[prefix + f.name.replace("_", "-")] = getattr(obj, f.name)
        return flat


def _sections() -> dict[str, type]:
    return {("" if f.name == "server" else f.name): f.default_factory for f in fields(RunConfig)}  # type: ignore[misc]


def known_keys() -> list[str]:
    return list(RunConfig().to_flat())


def _coerce(key: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        _fail(key, f"expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        _fail(key, f"expected an integer, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and value.strip().lower() in ("inf", "+inf", "infinity"):
            return math.inf
        _fail(key, f"expected a number, got {value!r}")
    if kind is str:
        if isinstance(value, str):
            return value
        _fail(key, f"expected a string, got {value!r}")
    raise AssertionError(kind)


def parse_run_config(flat: Mapping[str, Any]) -> RunConfig:
    """Validate Flower's flat run config (missing keys take their defaults); ConfigError names the key."""
    sections = _sections()
    values: dict[str, dict[str, Any]] = {name: {} for name in sections}
    known = known_keys()
    flat = _merge_per_modality(flat)
    for key, value in flat.items():
        section, _, name = key.rpartition(".")
        cls = sections.get(section)
        field_types = {f.name: f.type for f in fields(cls)} if cls else {}
        attr = name.replace("-", "_")
        if cls is None or attr not in field_types or "_" in name:
            hint = difflib.get_close_matches(key, known, n=1)
            raise ConfigError(
                f"unknown run config key '{key}'"
                + (f"; did you mean '{hint[0]}'?" if hint else "")
                + f" (known keys: {', '.join(known)})"
            )
        type_name = str(field_types[attr])
        if type_name == "float | str":  # a number, or the word "auto"
            if isinstance(value, str) and value.strip().lower() == AUTO:
                values[section][attr] = AUTO
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                values[section][attr] = float(value)
            else:
                _fail(key, f'expected a number or "{AUTO}", got {value!r}')
            continue
        kind = {"int": int, "float": float, "bool": bool, "str": str}[type_name]
        values[section][attr] = _coerce(key, value, kind)
    built = {("server" if s == "" else s): cls(**values[s]) for s, cls in sections.items()}
    return RunConfig(**built)


def _merge_per_modality(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``model.encoder.<modality> = "x"`` keys (a TOML table) merged into the ``model.encoder`` string."""
    out = dict(flat)
    for key in PER_MODALITY:
        single = {k: v for k, v in flat.items() if k.startswith(key + ".")}
        if not single:
            continue
        merged = _per_modality(key, _coerce(key, out.get(key, ""), str))
        for k, value in single.items():
            del out[k]
            name = k[len(key) + 1 :]
            if not _MODALITY.match(name):
                _fail(k, f"'{name}' is not a modality name (lower-case letters, digits, '_')")
            if name in merged:
                _fail(k, f"modality '{name}' is also named in '{key}'")
            merged[name] = _coerce(k, value, str).strip()
        out[key] = _join(merged)
    return out


def run_out_dir(config: RunConfig, flower_run_id: int) -> Path:
    """The run output folder, shared by the ServerApp and simulated ClientApps (``./runs/run-<id>`` by default)."""
    if config.server.out_dir:
        return Path(config.server.out_dir).expanduser().resolve()
    return Path.cwd() / "runs" / f"run-{flower_run_id}"


def flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested TOML tables into Flower's ``a.b`` keys."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Nest Flower's ``a.b`` keys into TOML tables (the inverse of :func:`flatten`)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *tables, name = key.split(".")
        node = out
        for table in tables:
            node = node.setdefault(table, {})
        node[name] = value
    return out


assert all(is_dataclass(c) for c in _sections().values())
