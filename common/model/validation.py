"""Checks an encoder must pass before it touches any data, and a deployed site's allowlist of factories.

An encoder named in the run config (``model.encoder.<modality>``) is built from the modality's schema
and checked on a tiny batch of synthetic inputs built from that schema (never from records):

1. it is a ``torch.nn.Module`` that Opacus's ``ModuleValidator`` accepts (no BatchNorm: use GroupNorm);
2. its output is (B, embed_dim), finite, also for a zero-filled input (how an absent modality arrives);
3. it is deterministic (no dropout: randomness drawn per batch position is not per-record secret randomness);
4. no batch mixing: each sample's output is what that sample alone gives, and changing one sample
   changes no other sample's output;
5. the run's grad-sample mode (``train.grad-sample-mode``) supports it, and its per-sample gradients equal
   those of a loop over single samples, for every trainable parameter.

A failed check raises :class:`~common.errors.EncoderError` with the reason; the text depends only on the
encoder and the schema. Results are cached per process (a site builds its model for every message).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from typing import Any

import torch
from opacus.grad_sample import prepare_module
from opacus.validators import ModuleValidator
from torch import nn

from common.data.schema import ModalitySpec
from common.errors import EncoderError
from common.model.encoders import DEFAULT, build_encoder, check_choice, is_factory_ref
from common.privacy.grad_samplers import FlatGradSample

ALLOWLIST_KEY = "allowed-encoders"  # node config: the factories this site may import, comma-separated
BATCH = 4  # synthetic samples: three random, one zero-filled (an absent modality)
_BATCH_NORMS = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)


def allowlist(node_config: Mapping[str, Any]) -> tuple[str, ...]:
    """The factories a deployed site's node config allows (``allowed-encoders = "pkg.mod:fn,other.mod:fn"``)."""
    raw = node_config.get(ALLOWLIST_KEY, "")
    if not isinstance(raw, str):
        raise EncoderError(
            f"node config key '{ALLOWLIST_KEY}' must be a string of comma-separated factories "
            f'("package.module:function,..."), got {raw!r}'
        )
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def site_refusal(encoders: Mapping[str, str], node_config: Mapping[str, Any]) -> str | None:
    """Why a deployed site refuses the run's encoder factories (None: every factory named is allowed).

    Built-in encoders need no allowlist (they are part of the fedfuse the site reviewed); a factory imports
    code the operator chose, so the site imports only those its own node config lists. Decided from the
    run config and the node config alone, before any data is loaded.
    """
    allowed = set(allowlist(node_config))
    refused = sorted({choice for choice in encoders.values() if is_factory_ref(choice) and choice not in allowed})
    if not refused:
        return None
    return (
        f"this site does not allow the encoder factory {', '.join(repr(r) for r in refused)}: a site imports "
        f"only the factories its node config lists under '{ALLOWLIST_KEY}' "
        f"({', '.join(sorted(allowed)) or 'none'})"
    )


def check_model_encoders(
    specs: tuple[ModalitySpec, ...], encoders: Mapping[str, str], embed_dim: int, grad_sample_mode: str
) -> None:
    """Check every encoder the run config names for one of ``specs`` (EncoderError on the first refusal)."""
    for spec in specs:
        choice = encoders.get(spec.name, DEFAULT)
        if choice != DEFAULT:
            check_encoder(spec, embed_dim, choice, grad_sample_mode)


def check_run_encoders(
    specs: tuple[ModalitySpec, ...],
    encoders: Mapping[str, str],
    inits: Mapping[str, str],
    embed_dim: int,
    grad_sample_mode: str,
    *,
    norm: str = "none",
    width: int = 0,
) -> None:
    """Before a simulation starts: every modality named in ``model.encoder.*`` / ``model.init.*`` exists, every
    named encoder passes its checks, every init file fits its encoder (EncoderError otherwise)."""
    from common.model.warm_start import read_encoder_weights

    names = {s.name: s for s in specs}
    for key, named in (("model.encoder", encoders), ("model.init", inits)):
        unknown = sorted(set(named) - set(names))
        if unknown:
            raise EncoderError(
                f"{key}.{unknown[0]}: the federation has no modality '{unknown[0]}' (its modalities: {', '.join(sorted(names))})"
            )
    check_model_encoders(tuple(specs), encoders, embed_dim, grad_sample_mode)
    for modality, path in inits.items():
        encoder = build_encoder(names[modality], embed_dim, encoders.get(modality, DEFAULT), norm=norm, width=width)
        read_encoder_weights(path, encoder, modality)


@functools.lru_cache(maxsize=64)
def check_encoder(spec: ModalitySpec, embed_dim: int, choice: str, grad_sample_mode: str) -> None:
    """Run every check on the encoder ``choice`` for ``spec``; EncoderError names the first that fails."""
    check_choice(spec.name, choice)
    where = f"model.encoder.{spec.name} = {choice!r}"
    with torch.random.fork_rng(devices=[]):  # the checks' own randomness leaves the caller's RNG as it was
        torch.manual_seed(0)
        try:
            module = build_encoder(spec, embed_dim, choice)
        except EncoderError:
            raise
        except Exception as exc:  # noqa: BLE001  (a factory's own failure, reported as the factory's)
            raise EncoderError(f"{where}: the factory raised {type(exc).__name__}: {exc}") from None
        _check_opacus(module, where)
        module.train()
        x = synthetic_batch(spec)
        _check_output(module, x, embed_dim, where)
        _check_deterministic(module, x, where)
        _check_independent(module, x, spec, where)
        _check_grad_samples(module, x, grad_sample_mode, where)


def synthetic_batch(spec: ModalitySpec, batch: int = BATCH) -> torch.Tensor:
    """``batch`` synthetic inputs of ``spec``'s shape and dtype; the last is zero-filled (an absent modality)."""
    g = torch.Generator().manual_seed(1)
    if spec.kind == "text":
        assert spec.vocab_size is not None
        x = torch.randint(1, spec.vocab_size, (batch, *spec.shape), generator=g)
        x[0, spec.shape[0] // 2 :] = 0  # one sample padded halfway
    else:
        x = torch.randn((batch, *spec.shape), generator=g)
    x[-1] = 0
    return x


def _check_opacus(module: nn.Module, where: str) -> None:
    norms = [f"'{name}' ({type(m).__name__})" for name, m in module.named_modules() if isinstance(m, _BATCH_NORMS)]
    if norms:
        raise EncoderError(
            f"{where}: layer {', '.join(norms)} normalises over the batch, so one sample's output "
            "depends on the other samples and per-sample clipping no longer bounds one record's "
            "influence; use torch.nn.GroupNorm (or LayerNorm), which normalises each sample alone"
        )
    errors = ModuleValidator.validate(module, strict=False)
    if errors:
        raise EncoderError(f"{where}: Opacus's ModuleValidator refuses it: {'; '.join(str(e) for e in errors)}")
    if not any(p.requires_grad for p in module.parameters()):
        raise EncoderError(f"{where}: it has no trainable parameters")


def _run(module: nn.Module, x: torch.Tensor, where: str) -> torch.Tensor:
    try:
        with torch.no_grad():
            return module(x)
    except Exception as exc:  # noqa: BLE001  (the encoder's own failure on a well-formed input)
        raise EncoderError(
            f"{where}: it fails on a synthetic batch of shape {tuple(x.shape)} ({type(exc).__name__}: {exc})"
        ) from None


def _check_output(module: nn.Module, x: torch.Tensor, embed_dim: int, where: str) -> None:
    out = _run(module, x, where)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (x.shape[0], embed_dim):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise EncoderError(
            f"{where}: it must map a batch of shape {tuple(x.shape)} to ({x.shape[0]}, {embed_dim}) "
            f"(batch, model.embed-dim), got {shape}"
        )
    if not torch.isfinite(out).all():
        raise EncoderError(
            f"{where}: its output is not finite on a synthetic batch (a zero-filled input is how an "
            "absent modality arrives: it must give a finite embedding too)"
        )


def _check_deterministic(module: nn.Module, x: torch.Tensor, where: str) -> None:
    if not torch.equal(_run(module, x, where), _run(module, x, where)):
        raise EncoderError(
            f"{where}: its output is random in training mode (e.g. nn.Dropout): randomness drawn per "
            "batch position is neither secret nor per record, so one record would change what happens "
            "to the others; remove it"
        )


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * (1.0 + float(b.abs().max()))))


def _check_independent(module: nn.Module, x: torch.Tensor, spec: ModalitySpec, where: str) -> None:
    batched = _run(module, x, where)
    alone = torch.cat([_run(module, x[i : i + 1], where) for i in range(x.shape[0])])
    changed = x.clone()
    changed[0] = synthetic_batch(spec, 2)[1] if spec.kind == "text" else -x[0] + 1.0
    others = _run(module, changed, where)[1:]
    if not _close(batched, alone) or not _close(others, batched[1:]):
        raise EncoderError(
            f"{where}: it mixes samples: one sample's output depends on the other samples of the batch "
            "(batch statistics, attention or pooling across the batch dimension); under DP-SGD each "
            "record's gradient must depend on that record alone"
        )


def _loss_weights(out_shape: torch.Size) -> torch.Tensor:
    return torch.randn(out_shape, generator=torch.Generator().manual_seed(2))


def _reference_grads(module: nn.Module, x: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
    """Each sample's gradient of its own loss (out_i . w_i), by a loop over single samples: (B, *p.shape) per p."""
    w = _loss_weights(torch.Size((x.shape[0], *module(x[:1]).shape[1:])))
    rows = []
    for i in range(x.shape[0]):
        loss = (module(x[i : i + 1]) * w[i : i + 1]).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)])
    return [torch.stack([row[j] for row in rows]) for j in range(len(params))]


def _check_grad_samples(module: nn.Module, x: torch.Tensor, mode: str, where: str) -> None:
    model = copy.deepcopy(module)
    params = [p for p in model.parameters() if p.requires_grad]
    names = {p: n for n, p in model.named_parameters()}
    expected = dict(zip(params, _reference_grads(model, x, params)))
    w = _loss_weights(torch.Size((x.shape[0], *model(x[:1]).shape[1:])))
    unsupported = f'{where}: train.grad-sample-mode = "{mode}" cannot compute its per-sample gradients'
    if mode == "flat":
        try:
            flat = FlatGradSample(model)
        except ValueError as exc:
            raise EncoderError(f"{unsupported}: {exc}") from None
        try:
            (flat(x) * w).sum(dim=tuple(range(1, w.dim()))).mean().backward()
            got = {p: flat.flat.grad_sample[:, lo:hi].reshape(x.shape[0], *p.shape) for p, (lo, hi) in flat._slices.items()}
        finally:
            flat.release()
    else:
        try:
            ModuleValidator.validate(model, strict=True)
            wrapped = prepare_module(model, grad_sample_mode=mode, batch_first=True, loss_reduction="mean")
        except Exception as exc:  # noqa: BLE001  (Opacus's refusal, reported with its reason)
            raise EncoderError(f"{unsupported}: {type(exc).__name__}: {exc}") from None
        try:
            (wrapped(x) * w).sum(dim=tuple(range(1, w.dim()))).mean().backward()
            got = {p: p.grad_sample for p in params}
        except Exception as exc:  # noqa: BLE001
            raise EncoderError(f"{unsupported}: {type(exc).__name__}: {exc}") from None
        finally:
            wrapped._close()
    for p in params:
        g = got.get(p)
        if g is None:
            raise EncoderError(f"{unsupported}: parameter '{names[p]}' gets none (does it take part in the output?)")
        if tuple(g.shape) != tuple(expected[p].shape) or not _close(g, expected[p]):
            diff = float((g - expected[p]).abs().max()) if g.shape == expected[p].shape else float("nan")
            raise EncoderError(
                f"{unsupported} exactly: parameter '{names[p]}' differs from a loop over single samples "
                f"by up to {diff:.3g}; use another train.grad-sample-mode or other layers"
            )
