"""Tests' shorthand for train_round's settings: flat keywords split into its DPRequest and LocalTraining."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from common.privacy.training import DPRequest, LocalTraining

_DP = {f.name for f in fields(DPRequest)}
_TRAINING = {f.name for f in fields(LocalTraining)}


def settings(**keywords: Any) -> dict[str, Any]:
    """``train_round`` keywords from flat ones (``target_epsilon`` is ``dp.epsilon``); the rest pass through."""
    keywords = dict(keywords)
    if "target_epsilon" in keywords:
        keywords["epsilon"] = keywords.pop("target_epsilon")
    dp = {k: keywords.pop(k) for k in list(keywords) if k in _DP}
    training = {k: keywords.pop(k) for k in list(keywords) if k in _TRAINING}
    return dict(dp=DPRequest(**dp), training=LocalTraining(**training), **keywords)
