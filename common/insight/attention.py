"""Attention fusion's weight per modality on held-out data, per class: which input the head listens to.

A client sums, over its held-out samples that have at least two modalities present (with one, the
weight is 1 whatever the model learnt), the pooling weight of each present modality, per true class,
and counts those samples. These sums and counts travel as evaluation metrics (``release.eval-metrics``,
held-out data only); the server adds them up over clients, and the mean weight of modality m on
class c is the sum over the count. Other fusion heads have no attention: nothing is sent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from common import messages as M
from common.data.samples import MultimodalData
from common.model.fusion import AttentionFusion
from common.model.multimodal import MultimodalModel


@torch.no_grad()
def attention_sums(
    model: MultimodalModel, data: MultimodalData, batch_size: int = 512
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(sums, counts)``, both (M, K): summed attention weight and number of samples, per modality and true
    class, over samples with at least two modalities present; None when the head has no attention."""
    if not isinstance(model.head, AttentionFusion):
        return None
    model.eval()
    m, k = len(data.schema.names), data.schema.num_classes
    sums, counts = torch.zeros((m, k), dtype=torch.float64), torch.zeros((m, k), dtype=torch.int64)
    onehot = torch.nn.functional.one_hot(data.labels, k)  # (N, K)
    for start in range(0, len(data), batch_size):
        sl = slice(start, start + batch_size)
        mask = data.mask[sl]
        weights = model.head.attention(model.embed({n: x[sl] for n, x in data.inputs.items()}, mask), mask)  # (B, M)
        used = mask & (mask.sum(dim=1, keepdim=True) >= 2)  # (B, M)
        sums += (weights.double() * used).T @ onehot[sl].double()  # (M, K)
        counts += used.long().T @ onehot[sl]
    return sums, counts


def attention_metrics(model: MultimodalModel, data: MultimodalData) -> dict[str, float | int]:
    """The evaluation metrics of :func:`attention_sums`, ``attention.<modality>.<class>.<sum|count>`` (empty without attention)."""
    result = attention_sums(model, data)
    if result is None:
        return {}
    sums, counts = result
    out: dict[str, float | int] = {}
    for i, name in enumerate(data.schema.names):
        for c in range(data.schema.num_classes):
            if counts[i, c]:
                out[f"{M.ATTENTION_PREFIX}{name}.{c}.{M.ATTENTION_SUM}"] = float(sums[i, c])
                out[f"{M.ATTENTION_PREFIX}{name}.{c}.{M.ATTENTION_COUNT}"] = int(counts[i, c])
    return out


def parse_key(key: str) -> tuple[str, int, str]:
    """``attention.<modality>.<class>.<sum|count>`` -> (modality, class, field); ValueError otherwise."""
    modality, c, name = key[len(M.ATTENTION_PREFIX) :].rsplit(".", 2)
    if not modality or name not in (M.ATTENTION_SUM, M.ATTENTION_COUNT) or not c.isdigit():
        raise ValueError(f"bad attention metric '{key}'")
    return modality, int(c), name


def pool(reports: Iterable[Mapping[str, float]]) -> dict[str, dict[str, dict[str, float]]] | None:
    """Sum clients' attention metrics: ``{modality: {class index: {"mean": weight, "samples": n}}}`` (None if none)."""
    sums: dict[tuple[str, int], list[float]] = {}
    for metrics in reports:
        for key, value in metrics.items():
            modality, c, name = parse_key(key)
            acc = sums.setdefault((modality, c), [0.0, 0.0])
            acc[0 if name == M.ATTENTION_SUM else 1] += float(value)
    if not sums:
        return None
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (modality, c), (total, n) in sorted(sums.items()):
        if n > 0:
            out.setdefault(modality, {})[str(c)] = {"mean": total / n, "samples": int(n)}
    return out
