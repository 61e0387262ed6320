"""``fedfuse bench dp-overhead``: time of one DP-SGD step / one non-private step (default model, batch 64).

Both steps are the real training loop's (:func:`common.privacy.training.dp_step`, :func:`common.privacy.training.non_private_step`):
gather the batch, modality dropout (secret, per record), forward, loss (non-finite rows counting zero), backward,
optimizer step; for DP also
per-sample gradients, clipping to C over all parameters, noise sigma * C on every parameter and the
accountant's step hook (Opacus's DPOptimizer). Model: the synthetic schema's three modalities, default
ModelConfig (or its ``--norm`` / ``--width``), the same initial weights and batches for every variant. The variants are timed in one
process, in rotation (A B C, B C A, ...) after warm-up; the ratio is the median over repeats of
(DP step time / non-private step time of the same repeat), printed last.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import platform
import shlex
import statistics
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.config import TrainSection
from common.data import synthetic
from common.errors import ConfigError
from common.model.multimodal import ModelConfig, MultimodalModel
from common.privacy.randomness import RoundRandomness
from common.privacy.training import (
    GRAD_SAMPLE_MODES,
    PoissonSampler,
    PrivateTraining,
    _batch,
    dp_step,
    non_private_step,
    private_training,
    sampling_plan,
)

EXTRA_MODES = ("ghost",)  # Opacus modes the training loop does not offer, measured for comparison only
NON_PRIVATE = "non-private"


def configure(parser: argparse.ArgumentParser) -> None:
    modes = ", ".join(GRAD_SAMPLE_MODES + EXTRA_MODES)
    parser.add_argument("--batch-size", type=int, default=64, help="samples per step (default 64)")
    parser.add_argument("--repeats", type=int, default=1000, help="timed steps per variant (default 1000)")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps per variant first (default 30)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument(
        "--modes",
        default=GRAD_SAMPLE_MODES[0],
        help=f"comma-separated grad-sample modes to time against the non-private step ({modes}); "
        f"the first one's ratio is printed last (default {GRAD_SAMPLE_MODES[0]})",
    )
    parser.add_argument("--noise-multiplier", type=float, default=1.0, help="sigma (default 1.0; does not change the cost)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping norm C (default 1.0)")
    parser.add_argument(
        "--poisson",
        action="store_true",
        help="DP steps draw their batch from the real Poisson sampler (expected size --batch-size; "
        "the draw is timed); the non-private step of the same repeat uses a batch of that size",
    )
    parser.add_argument(
        "--norm", choices=("none", "group", "layer"), default="none", help="model.norm of the CNN encoders (default none)"
    )
    parser.add_argument("--width", type=int, default=0, help="model.width of the CNN encoders (default 0: their defaults)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print where each variant's step time goes (phases; per-sample gradients by layer type)",
    )


def run(args: argparse.Namespace) -> int:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in GRAD_SAMPLE_MODES + EXTRA_MODES]
    if not modes or bad:
        raise ConfigError(f"--modes: unknown mode(s) {bad or modes}; choose from {list(GRAD_SAMPLE_MODES + EXTRA_MODES)}")
    for name in ("batch_size", "repeats", "threads"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        raise ConfigError("--warmup must be >= 0")
    torch.set_num_threads(args.threads)
    train = TrainSection()
    config = ModelConfig(norm=args.norm, width=args.width)
    data = synthetic.generate(args.batch_size * 20, seed=0)
    init = MultimodalModel(data.schema, config).state_dict()
    batches = _fixed_batches(len(data), args.batch_size, count=50)

    print(
        f"machine: {_cpu_name()} ({os.cpu_count()} CPUs), load average {_load()}, {platform.python_implementation()} "
        f"{platform.python_version()}, torch {torch.__version__}, opacus {_opacus_version()}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"command: {_command(args)}")
    print(
        f"model: synthetic schema ({', '.join(data.schema.names)}), {config}, "
        f"{sum(v.numel() for v in init.values())} parameters; batch {args.batch_size}"
        f"{' (Poisson, expected)' if args.poisson else ''}; lr {train.lr}, momentum {train.momentum}, "
        f"modality dropout {train.modality_dropout}; sigma {args.noise_multiplier}, C {args.max_grad_norm}"
    )

    # Build every variant from the same weights.
    variants: dict[str, _Variant] = {NON_PRIVATE: _non_private(data, init, config, train)}
    for mode in modes:
        try:
            variants[mode] = _private(mode, data, init, config, train, args)
        except Exception as exc:  # a mode that cannot run this model is reported, not fatal
            print(f"dp-{mode}: cannot run: {type(exc).__name__}: {exc}")
    generator = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for name in list(variants):
            try:
                for i in range(args.warmup or 1):
                    variants[name].step(batches[i % len(batches)])
            except Exception as exc:
                print(f"dp-{name}: cannot run: {type(exc).__name__}: {exc}")
                variants.pop(name).close()
        if NON_PRIVATE not in variants:
            raise RuntimeError("the non-private step failed; see above")
        times, cpu = _time_rotated(variants, batches, generator, repeats=args.repeats, poisson=args.poisson)
        if args.profile:
            _profile(variants, data, batches, repeats=max(20, args.repeats // 4))
    for v in variants.values():
        v.close()

    # Report: medians, then each mode's ratio, the first requested mode's last.
    print(f"{'variant':<16}{'median ms':>10}{'p25 ms':>9}{'p75 ms':>9}{'CPU ms':>9}")
    for name, ts in times.items():
        q = _quartiles(ts)
        print(
            f"{_label(name):<16}{statistics.median(ts) * 1e3:>10.3f}{q[0] * 1e3:>9.3f}{q[1] * 1e3:>9.3f}"
            f"{statistics.median(cpu[name]) * 1e3:>9.3f}"
        )
    print(f"load average after: {_load()}")
    measured = [m for m in modes if m in times]
    for mode in measured[1:] + measured[:1]:  # the first requested mode last
        cpu_ratios = [d / n for d, n in zip(cpu[mode], cpu[NON_PRIVATE])]
        q = _quartiles(cpu_ratios)
        print(
            f"dp-{mode} ratio of CPU times (median of {len(cpu_ratios)} pairs; p25 {q[0]:.2f}, p75 {q[1]:.2f}): "
            f"{statistics.median(cpu_ratios):.2f}"
        )
    for mode in measured[1:] + measured[:1]:
        ratios = [d / n for d, n in zip(times[mode], times[NON_PRIVATE])]
        q = _quartiles(ratios)
        label = "dp-overhead ratio" if mode == measured[0] else f"dp-{mode} ratio"
        print(
            f"{label} [mode {mode}, wall clock; pairs p25 {q[0]:.2f}, p75 {q[1]:.2f}] "
            f"(median of {len(ratios)} pairs): {statistics.median(ratios):.2f}"
        )
    return 0 if measured else 1


@dataclass
class _Variant:
    """One way of training: ``step(idx)`` runs the real loop's step on the batch ``idx``."""

    model: torch.nn.Module  # what the step calls
    optimizer: torch.optim.Optimizer  # what the step steps (a DPOptimizer for DP variants)
    private: PrivateTraining | None = None  # None for the non-private step
    loss: Callable = F.cross_entropy
    step: Callable[[torch.Tensor], None] = lambda idx: None
    close: Callable[[], None] = lambda: None


def _non_private(data, init, config: ModelConfig, train: TrainSection) -> _Variant:
    model = MultimodalModel(data.schema, config)
    model.load_state_dict(init)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=train.lr, momentum=train.momentum)
    count, randomness = itertools.count(), RoundRandomness()

    def step(idx: torch.Tensor) -> None:
        non_private_step(
            model, optimizer, data, idx, modality_dropout=train.modality_dropout, randomness=randomness, step=next(count)
        )

    return _Variant(model, optimizer, step=step)


def _private(mode: str, data, init, config: ModelConfig, train: TrainSection, args: argparse.Namespace) -> _Variant:
    model = MultimodalModel(data.schema, config)
    model.load_state_dict(init)
    model.train()
    if mode == "ghost":
        return _ghost(model, data, train, args)
    private = private_training(
        model,
        len(data),
        accountant="prv",
        noise_multiplier=args.noise_multiplier,
        max_grad_norm=args.max_grad_norm,
        batch_size=args.batch_size,
        lr=train.lr,
        momentum=train.momentum,
        grad_sample_mode=mode,
    )
    count = itertools.count()

    def step(idx: torch.Tensor) -> None:
        dp_step(private, data, idx, modality_dropout=train.modality_dropout, step=next(count))

    return _Variant(private.model, private.optimizer, private, step=step, close=private.close)


def _ghost(model, data, train: TrainSection, args: argparse.Namespace) -> _Variant:
    """Opacus's ghost clipping (two backward passes through its wrapped criterion); comparison only."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    optimizer = torch.optim.SGD(model.parameters(), lr=train.lr, momentum=train.momentum)
    loader = DataLoader(TensorDataset(torch.arange(len(data))), batch_size=args.batch_size)
    randomness, count = RoundRandomness(), itertools.count()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="prv")
        dp_model, dp_optimizer, criterion, _ = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            criterion=torch.nn.CrossEntropyLoss(),
            noise_multiplier=args.noise_multiplier,
            max_grad_norm=args.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode="ghost",
            noise_generator=randomness.noise_generator(),
        )
    private = PrivateTraining(
        dp_model,
        dp_optimizer,
        engine.accountant,
        dp_model._close,
        PoissonSampler(len(data), *sampling_plan(len(data), args.batch_size, 1), randomness),
    )

    def step(idx: torch.Tensor) -> None:
        inputs, mask, labels = _batch(data, idx)
        mask = randomness.hide_modalities(next(count), idx, mask, train.modality_dropout, num_examples=len(data))
        loss = criterion(dp_model(inputs, mask), labels)
        loss.item()
        loss.backward()
        dp_optimizer.step()
        dp_optimizer.zero_grad(set_to_none=True)

    return _Variant(dp_model, dp_optimizer, private, loss=criterion, step=step, close=dp_model._close)


def _fixed_batches(n: int, size: int, *, count: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randperm(n, generator=g)[:size] for _ in range(count)]


def _poisson_batches(variant: _Variant) -> Iterator[torch.Tensor]:
    assert variant.private is not None
    for step in itertools.count():
        yield variant.private.batch(step)


def _time_rotated(
    variants: dict[str, _Variant], batches: list[torch.Tensor], generator: torch.Generator, *, repeats: int, poisson: bool
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per variant, ``repeats`` step times (wall clock, and this thread's CPU time); in repeat r the variants
    run in the order rotated by r. With ``poisson``, each DP variant's time includes drawing its batch from its
    Poisson sampler, and the non-private step gets a batch as large as the first DP variant's."""
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    draws = {name: _poisson_batches(v) for name, v in variants.items() if poisson and v.private is not None}
    num_examples = len(batches[0]) * 20
    for r in range(repeats):
        batch = {name: batches[r % len(batches)] for name in names}
        drawn = {name: (0.0, 0.0) for name in names}
        for name, draw in draws.items():
            start, start_cpu = time.perf_counter(), time.thread_time()
            batch[name] = next(draw)
            drawn[name] = (time.perf_counter() - start, time.thread_time() - start_cpu)
        if draws:
            size = len(batch[next(iter(draws))])
            batch[NON_PRIVATE] = torch.randperm(num_examples, generator=generator)[:size]
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            start, start_cpu = time.perf_counter(), time.thread_time()
            variants[name].step(batch[name])
            times[name].append(time.perf_counter() - start + drawn[name][0])
            cpu[name].append(time.thread_time() - start_cpu + drawn[name][1])
    return times, cpu


@contextlib.contextmanager
def _timed_samplers(spent: dict[str, float]) -> Iterator[None]:
    """Add each flat per-sample gradient sampler call's CPU time to ``spent[layer type]`` (profiling only)."""
    from common.privacy import grad_samplers

    original = dict(grad_samplers.SAMPLERS)

    def timed(kind: str, fn: Callable) -> Callable:
        def wrapper(*args) -> None:
            start = time.thread_time()
            fn(*args)
            spent[kind] += time.thread_time() - start

        return wrapper

    for layer_type, fn in original.items():
        grad_samplers.SAMPLERS[layer_type] = timed(layer_type.__name__, fn)
    try:
        yield
    finally:
        grad_samplers.SAMPLERS.update(original)


def _profile(variants: dict[str, _Variant], data, batches: list[torch.Tensor], *, repeats: int) -> None:
    """Median CPU time of each phase of a step, per variant (the DP optimizer's pre_step taken apart)."""
    from common.privacy.grad_samplers import SAMPLERS

    train, randomness = TrainSection(), RoundRandomness()
    for name, v in variants.items():
        phases: dict[str, list[float]] = defaultdict(list)
        spent: dict[str, float] = defaultdict(float)
        opacus_steps = v.private is not None and name not in EXTRA_MODES  # a DPOptimizer.pre_step to take apart
        with _timed_samplers(spent) if name == "flat" else contextlib.nullcontext():
            for r in range(repeats):
                spent.clear()
                t = [time.thread_time()]
                idx = batches[r % len(batches)]
                inputs, mask, labels = _batch(data, idx)
                mask = randomness.hide_modalities(r, idx, mask, train.modality_dropout, num_examples=len(data))
                t.append(time.thread_time())
                loss = v.loss(v.model(inputs, mask), labels)
                loss.item()
                t.append(time.thread_time())
                if v.private is None:
                    v.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                t.append(time.thread_time())
                if opacus_steps:
                    opt = v.optimizer
                    for phase in (
                        opt.clip_and_accumulate,
                        opt.add_noise,
                        opt.scale_grad,
                        lambda: opt.step_hook(opt),  # noqa: B023 (called in this iteration)
                        opt.original_optimizer.step,
                        lambda: opt.zero_grad(set_to_none=True),  # noqa: B023
                    ):
                        phase()
                        t.append(time.thread_time())
                    labels_ = ("clip (norms, sum)", "noise", "scale", "accountant hook", "SGD step", "zero_grad")
                else:
                    v.optimizer.step()
                    t.append(time.thread_time())
                    if v.private is not None:
                        v.optimizer.zero_grad(set_to_none=True)
                    labels_ = ("optimizer step",)
                for label, a, b in zip(("batch + dropout", "forward + loss", "backward") + labels_, t, t[1:]):
                    phases[label].append(b - a)
                phases["total"].append(t[-1] - t[0])
                if name == "flat":
                    for layer_type in SAMPLERS:
                        phases[f"  per-sample {layer_type.__name__}"].append(spent[layer_type.__name__])
        print(
            f"profile {_label(name)} (median CPU ms over {repeats} steps): "
            + ", ".join(f"{k.strip()} {statistics.median(x) * 1e3:.3f}" for k, x in phases.items())
        )


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def _label(name: str) -> str:
    return name if name == NON_PRIVATE else f"dp-{name}"


def _command(args: argparse.Namespace) -> str:
    """The full command that reproduces this run (every option spelled out)."""
    nice = f"nice -n {os.nice(0)} " if os.nice(0) > 0 else ""
    flags = "".join(f" --{f}" for f in ("poisson", "profile") if getattr(args, f))
    flags += "".join(
        f" --{f} {getattr(args, f)}" for f, default in (("norm", "none"), ("width", 0)) if getattr(args, f) != default
    )
    return (
        f"{nice}fedfuse bench dp-overhead --batch-size {args.batch_size} --repeats {args.repeats} "
        f"--warmup {args.warmup} --threads {args.threads} --modes {shlex.quote(args.modes)} "
        f"--noise-multiplier {args.noise_multiplier} --max-grad-norm {args.max_grad_norm}{flags}"
    )


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _load() -> str:
    with contextlib.suppress(OSError, AttributeError):
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    return "n/a"


def _opacus_version() -> str:
    import opacus

    return opacus.__version__
