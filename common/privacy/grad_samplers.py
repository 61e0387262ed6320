"""Exact per-sample gradients of every parameter in one flat (B, P) buffer, for Opacus's DP-SGD.

:class:`FlatGradSample` wraps a model for Opacus's ``no_op`` grad-sample mode: it exposes ONE
parameter, a flat vector holding all the model's parameters (the model's own parameters become
views of it), and fills ``flat.grad_sample`` (B, P) with each sample's gradient of every
parameter. Opacus's unmodified :class:`~opacus.optimizers.DPOptimizer` then clips each row to
norm C over all P coordinates, sums, adds N(0, sigma^2 C^2) to every coordinate and steps: the
same mechanism as per-parameter clipping, in one norm, one contraction and one noise draw.

How the per-sample gradients are computed: each layer's forward is wrapped to keep its input
and to put a hook on its output, which receives dL/d(output) in the backward pass; the layer's
per-sample gradient is written from the two (Linear: outer products, or a batched product over
positions; Conv: input patches gathered by a precomputed index, batched product; LayerNorm and
GroupNorm: normalised input, each sample's own statistics; Embedding: scatter of rows). The model's
parameters do not require grad while wrapped, so autograd computes only what flows between layers, never the (discarded) summed
weight gradients. A layer that took no part in the loss gets an exact zero per-sample gradient
(and noise, as every coordinate does). Only the layer types in :data:`SAMPLERS` are accepted;
anything else, or a tied weight, is refused at wrap time (use Opacus's ``hooks`` mode then).
Exactness against a per-sample loop: tests/test_bench_dp.py. Cost: ``fedfuse bench dp-overhead``.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from opacus.validators import ModuleValidator
from torch import nn
from torch.autograd import Variable

# A sampler writes the per-sample gradients of ``module``'s weight and bias into ``out_w`` (B, *weight.shape)
# and ``out_b`` (B, *bias.shape) or None, from its input ``x`` (B, ...) and ``g`` = d(sum of per-sample losses)/d(output).
Sampler = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], None]


def _linear(m: nn.Linear, x: torch.Tensor, g: torch.Tensor, out_w: torch.Tensor, out_b: torch.Tensor | None) -> None:
    if x.dim() == 2:  # x: (B, I), g: (B, O)
        torch.mul(g.unsqueeze(2), x.unsqueeze(1), out=out_w)  # (B, O, I)
        if out_b is not None:
            out_b.copy_(g)
        return
    b = x.shape[0]
    x3, g3 = x.reshape(b, -1, x.shape[-1]), g.reshape(b, -1, g.shape[-1])  # (B, T, I), (B, T, O)
    out_w.copy_(torch.bmm(g3.transpose(1, 2), x3))  # (B, O, I)
    if out_b is not None:
        torch.sum(g3, dim=1, out=out_b)


_PATCH_INDEX: dict[tuple, torch.Tensor] = {}


def _patch_index(m: nn.Conv1d | nn.Conv2d, shape: tuple[int, ...]) -> torch.Tensor:
    """For input shape (C, *spatial): the position in the zero-padded, flattened input of each patch element.

    Returns (L, C*k...) int64: for each of the L output positions, its patch in the weight's (C, k...) order
    (F.unfold's layout, transposed).
    """
    key = (shape, m.kernel_size, m.stride, m.padding, m.dilation)
    index = _PATCH_INDEX.get(key)
    if index is None:
        padded = [s + 2 * p for s, p in zip(shape[1:], m.padding)]
        positions = torch.arange(shape[0] * int(torch.tensor(padded).prod())).reshape(1, shape[0], *padded).double()
        if isinstance(m, nn.Conv1d):
            positions = positions.unsqueeze(2)  # (1, C, 1, T)
            kernel, dilation, stride = (1, *m.kernel_size), (1, *m.dilation), (1, *m.stride)
        else:
            kernel, dilation, stride = m.kernel_size, m.dilation, m.stride
        unfolded = F.unfold(positions, kernel, dilation, 0, stride)[0]  # type: ignore[arg-type]  # (C*k..., L)
        index = _PATCH_INDEX[key] = unfolded.t().contiguous().long()
    return index


def _conv_patches(m: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The input patch each output position saw: (B, L, C*k...); F.unfold's, transposed (a gather, ~3x faster here)."""
    index = _patch_index(m, tuple(x.shape[1:]))
    padded = F.pad(x, [p for p in reversed(m.padding) for _ in range(2)])  # (B, C, *padded)
    return padded.reshape(x.shape[0], -1).index_select(1, index.reshape(-1)).view(x.shape[0], *index.shape)


def _conv(m: nn.Conv1d | nn.Conv2d, x: torch.Tensor, g: torch.Tensor, out_w: torch.Tensor, out_b: torch.Tensor | None) -> None:
    b, o = g.shape[0], g.shape[1]
    g3 = g.reshape(b, o, -1)  # (B, O, L)
    out_w.view(b, o, -1).copy_(torch.bmm(g3, _conv_patches(m, x)))  # (B, O, L) @ (B, L, C*k...)
    if out_b is not None:
        torch.sum(g3, dim=2, out=out_b)


def _layer_norm(m: nn.LayerNorm, x: torch.Tensor, g: torch.Tensor, out_w: torch.Tensor, out_b: torch.Tensor | None) -> None:
    b, shape = x.shape[0], m.normalized_shape
    x_hat = F.layer_norm(x, shape, None, None, m.eps)  # (B, ..., *shape)
    torch.sum((g * x_hat).reshape(b, -1, *shape), dim=1, out=out_w)
    if out_b is not None:
        torch.sum(g.reshape(b, -1, *shape), dim=1, out=out_b)


def _group_norm(m: nn.GroupNorm, x: torch.Tensor, g: torch.Tensor, out_w: torch.Tensor, out_b: torch.Tensor | None) -> None:
    # x, g: (B, C, *spatial); weight and bias: (C,), one scale and shift per channel over its positions
    b, c = x.shape[:2]
    x_hat = F.group_norm(x, m.num_groups, None, None, m.eps)  # per sample and group: no batch statistics
    torch.sum((g * x_hat).reshape(b, c, -1), dim=2, out=out_w)
    if out_b is not None:
        torch.sum(g.reshape(b, c, -1), dim=2, out=out_b)


def _embedding(m: nn.Embedding, x: torch.Tensor, g: torch.Tensor, out_w: torch.Tensor, out_b: torch.Tensor | None) -> None:
    b, d = x.shape[0], m.embedding_dim
    out_w.zero_()
    idx = x.reshape(b, -1, 1).expand(-1, -1, d)  # (B, L, D)
    out_w.scatter_add_(1, idx, g.reshape(b, -1, d))  # (B, V, D)
    if m.padding_idx is not None:
        out_w[:, m.padding_idx].zero_()


SAMPLERS: dict[type[nn.Module], Sampler] = {
    nn.Linear: _linear,
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.LayerNorm: _layer_norm,
    nn.GroupNorm: _group_norm,
    nn.Embedding: _embedding,
}


_HUGE_PAGE = 2 << 20


def _empty_on_huge_pages(rows: int, cols: int) -> torch.Tensor:
    """An uninitialised float32 (rows, cols) tensor in 2 MiB-aligned memory the kernel may back with huge pages.

    The samplers write each layer's columns of all B rows, one 4 KiB page per row and layer: with
    small pages that is a TLB miss per row (costly under virtualisation); with huge pages the whole
    buffer is a handful of pages. Falls back to torch.empty where madvise is not available.
    """
    size = rows * cols * 4
    if not hasattr(mmap, "MADV_HUGEPAGE") or size < _HUGE_PAGE:
        return torch.empty(rows, cols)
    memory = mmap.mmap(-1, size + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(memory, dtype=torch.uint8)  # keeps ``memory`` alive as long as any view of it
    start = -raw.data_ptr() % _HUGE_PAGE
    return raw[start : start + size].view(torch.float32).view(rows, cols)


def _check_supported(name: str, m: nn.Module) -> None:
    own = {n for n, p in m.named_parameters(recurse=False) if p.requires_grad}
    problem = ""
    if type(m) not in SAMPLERS:
        problem = f"layer type {type(m).__name__} has no flat per-sample gradient sampler"
    elif not own <= {"weight", "bias"}:
        problem = f"parameters {sorted(own)} beyond weight and bias"
    elif isinstance(m, (nn.Conv1d, nn.Conv2d)) and (m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str)):
        problem = "grouped, non-zero-padded or 'same'/'valid'-padded convolution"
    elif isinstance(m, nn.Embedding) and (m.max_norm is not None or m.sparse):
        problem = "embedding with max_norm or sparse gradients"
    elif "weight" not in own:
        problem = "a frozen weight with a trainable bias"
    elif getattr(m, "bias", None) is not None and "bias" not in own:
        problem = "a trainable weight with a frozen bias"
    if problem:
        raise ValueError(
            f"grad_sample_mode 'flat' cannot compute exact per-sample gradients of '{name}': {problem}; "
            f"supported layers are {[t.__name__ for t in SAMPLERS]}. Use grad_sample_mode 'hooks' for this model."
        )


class FlatGradSample(nn.Module):
    """``model`` with all its parameters in one flat parameter ``flat`` that gets per-sample gradients.

    While wrapped, the model's parameters are views of ``flat`` (so in-place updates of either are
    shared) and do not require grad. Call :meth:`release` afterwards to give the model back its
    own, independent parameters with ``requires_grad`` restored. The loss must be the MEAN of
    per-sample losses over the batch (Opacus's ``loss_reduction="mean"``).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise ValueError(f"the model is not DP-compatible: {errors}")
        layers = [(n, m) for n, m in model.named_modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
        for name, m in layers:
            _check_supported(name, m)
            if "forward" in m.__dict__:
                raise ValueError(f"layer '{name}' already has an instance-level forward; grad_sample_mode 'flat' cannot wrap it")
        object.__setattr__(self, "model", model)  # not a submodule: the flat vector is the only parameter
        self._layers = [m for _, m in layers]
        params = [p for m in self._layers for p in (m.weight, getattr(m, "bias", None)) if p is not None]
        trainable = [p for p in model.parameters() if p.requires_grad]  # each shared parameter once
        if len(set(params)) != len(params) or set(params) != set(trainable):
            raise ValueError(
                "grad_sample_mode 'flat' needs every trainable parameter to belong to exactly one layer "
                "(no shared or tied weights); use grad_sample_mode 'hooks' for this model"
            )
        self._params = params
        self.flat = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params]))
        self._slices: dict[nn.Parameter, tuple[int, int]] = {}
        offset = 0
        for p in params:
            self._slices[p] = (offset, offset + p.numel())
            p.data = self.flat.data[offset : offset + p.numel()].view_as(p)
            p.requires_grad_(False)  # every parameter, at wrap time (data-independent): `flat` carries the grads
            offset += p.numel()
        # Capture each layer's input and output gradient: its forward is wrapped (an instance attribute that
        # release() deletes); cheaper here than a forward hook, which takes nn.Module's slow call path.
        for index, m in enumerate(self._layers):
            m.forward = partial(self._forward_layer, index, m.forward)
        self._store = torch.empty(0, offset)  # reused across steps: every row in use is rewritten each step
        self._views: dict[int, list[tuple[torch.Tensor | None, torch.Tensor | None]]] = {}
        self._step = 0
        self._batch: int | None = None
        self._written: list[bool] = []
        self._finished = True

    def forward(self, *args, **kwargs):
        self._step += 1
        self._batch, self._finished = None, False
        self.flat.grad_sample = None
        out = self.model(*args, **kwargs)
        if out.requires_grad:
            # A new node after the last layer, so that every layer's hook sees the scaled gradient.
            out = out.view_as(out)
            step = self._step
            out.register_hook(lambda g: self._start_backward(g, step))
        return out

    def release(self) -> None:
        """Unwrap the layers; the model's parameters become independent tensors that require grad again."""
        for m in self._layers:
            m.__dict__.pop("forward", None)
        for p in self._params:
            p.data = p.data.clone()
            p.requires_grad_(True)
        self._store = torch.empty(0, 0)
        self._views = {}

    def _layer_views(self, b: int) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        views = self._views.get(b)
        if views is None:
            if self._store.shape[0] < b:
                self._store = _empty_on_huge_pages(b, self.flat.numel())
                self._views = {}
            buf = self._store[:b]

            def view(p: nn.Parameter | None) -> torch.Tensor | None:
                if p is None or p not in self._slices:
                    return None
                lo, hi = self._slices[p]
                return buf[:, lo:hi].view(b, *p.shape)

            views = self._views[b] = [(view(m.weight), view(getattr(m, "bias", None))) for m in self._layers]
        return views

    def _forward_layer(self, index: int, forward: Callable, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = forward(x, *args, **kwargs)
        if not torch.is_grad_enabled():
            return out
        if self._batch is None:
            self._batch = x.shape[0]
            self._written = [False] * len(self._layers)
        elif x.shape[0] != self._batch:
            raise RuntimeError(f"a layer saw {x.shape[0]} samples in a batch of {self._batch}: inputs must be batch-first")
        if not out.requires_grad:  # a first layer: its input and (wrapped) parameters need no grad
            out.requires_grad_()
        out.register_hook(partial(self._sample, index, x.detach(), self._step))
        return out

    def _start_backward(self, g: torch.Tensor, step: int) -> torch.Tensor:
        if step != self._step or self._finished:
            raise RuntimeError("one backward pass per forward pass: flat per-sample gradients cannot accumulate")
        if self._batch is None:  # no layer ran with grad enabled: every per-sample gradient is zero
            self._batch, self._written = g.shape[0], [False] * len(self._layers)
        Variable._execution_engine.queue_callback(self._finish)
        return g * g.shape[0]  # mean loss -> gradients of each sample's own loss

    def _sample(self, index: int, x: torch.Tensor, step: int, g: torch.Tensor) -> None:
        if step != self._step or self._finished:
            raise RuntimeError("one backward pass per forward pass: flat per-sample gradients cannot accumulate")
        m = self._layers[index]
        out_w, out_b = self._layer_views(x.shape[0])[index]
        assert out_w is not None  # every wrapped layer has a trainable weight (_check_supported)
        if x.shape[0] == 0:  # an empty Poisson batch: nothing to write
            self._written[index] = True
            return
        if not self._written[index]:
            SAMPLERS[type(m)](m, x, g, out_w, out_b)
            self._written[index] = True
            return
        # The layer ran more than once in this forward pass: add this use's gradients.
        tmp_w, tmp_b = torch.empty_like(out_w), None if out_b is None else torch.empty_like(out_b)
        SAMPLERS[type(m)](m, x, g, tmp_w, tmp_b)
        out_w.add_(tmp_w)
        if out_b is not None:
            out_b.add_(tmp_b)

    def _finish(self) -> None:
        b = self._batch
        assert b is not None  # set by the first layer or by _start_backward
        views = self._layer_views(b)
        for index, written in enumerate(self._written):
            if not written:  # took no part in the loss: its per-sample gradient is exactly zero
                for v in views[index]:
                    if v is not None:
                        v.zero_()
        self._finished = True
        self.flat.grad_sample = self._store[:b]
