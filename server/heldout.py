"""Server-side evaluation of the global model on held-out sites (``data.server-test``).

Only meaningful with ``encoders = "federated"``: then the server holds a global encoder per
modality and the global head, i.e. a whole model, and can score it on sites that never trained
(e.g. HAPT's nine test subjects). Modalities no client has trained yet are left out.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from common.config import RunConfig
from common.data.partition import heldout_sites
from common.model.evaluation import evaluate
from common.model.multimodal import ENCODER_PREFIX, MultimodalModel
from server.metrics import summarize_evaluation
from server.replies import EvaluateReply

log = logging.getLogger("fedfuse.server")


class HeldoutEvaluator:
    """Scores a global state on the test samples of the held-out sites, overall and per modality subset."""

    def __init__(self, config: RunConfig):
        from common.data.site_folders import federation_schema, load_site

        sites = [load_site(p) for p in heldout_sites(config.data.server_test)]
        self.schema = federation_schema(sites)
        self.parts = [(s.name, s.part("test")) for s in sites if s.part("test") is not None]
        self.model_config = config.model
        log.info("server-side evaluation on %d held-out sites (%d samples)", len(self.parts), sum(len(p) for _, p in self.parts))

    def __call__(self, global_state: dict[str, torch.Tensor]) -> dict[str, Any] | None:
        trained = [m for m in self.schema.names if any(k.startswith(f"{ENCODER_PREFIX}{m}.") for k in global_state)]
        if not trained:
            return None
        model = MultimodalModel(self.schema.restrict(trained), self.model_config)
        model.load_partial({k: v for k, v in global_state.items() if k in model.state_dict()})
        scores = []
        for name, data in self.parts:
            present = [m for m in trained if m in data.schema]
            if not present:
                continue
            data = _widen(data.restrict(present), model)
            report = evaluate(model, data)
            by = {
                s: {"accuracy": m["accuracy"], "macro-f1": m["macro_f1"], "num-examples": m["num_examples"]}
                for s, m in report["by_modalities"].items()
            }
            overall = {"accuracy": report["accuracy"], "macro-f1": report["macro_f1"], "loss": report["loss"]}
            counts = {s: m["class_counts"] for s, m in report["by_modalities"].items()}
            scores.append(EvaluateReply(0, name, report["num_examples"], overall, by, report["confusion"], counts))
        # pooled: every held-out sample together, as centralised benchmarks report it; client_mean: per site
        return summarize_evaluation(scores, self.schema.labels)


def _widen(data: Any, model: MultimodalModel) -> Any:
    """Give a site's data every modality of the model (absent ones zero-filled and masked)."""
    from common.data.samples import MultimodalData

    if data.schema.names == model.schema.names:
        return data
    n = len(data)
    inputs, mask = {}, torch.zeros((n, len(model.schema.names)), dtype=torch.bool)
    for i, spec in enumerate(model.schema.modalities):
        if spec.name in data.schema:
            inputs[spec.name] = data.inputs[spec.name]
            mask[:, i] = data.mask[:, data.schema.index(spec.name)]
        else:
            inputs[spec.name] = torch.zeros((n, *spec.shape), dtype=torch.float32 if spec.dtype == "float32" else torch.int64)
    return MultimodalData(model.schema, inputs, mask, data.labels)
