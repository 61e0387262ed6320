"""Benchmarks behind `fedfuse bench <name>`: one module each, with ``configure(parser)`` and ``run(args)``.

Each prints the measured figures with the command and machine that produced them, ratios last.
"""

BENCHMARKS: dict[str, tuple[str, str]] = {
    "dp-overhead": ("dp_overhead", "time of one DP-SGD step / one non-private step (default model, batch 64)"),
    "round-overhead": ("round_overhead", "round wall time / summed client training time (10 simulated clients)"),
    "scale": ("scale", "per-round time and peak memory of a simulation, 100 vs 1,000 clients (one in 20 trains each round)"),
    "deploy-round": ("deploy_round", "per-round wall time of a real 3-site deployment: Flower defaults vs each improvement"),
    "hapt": ("hapt", "HAPT activity recognition: macro-F1 by privacy budget and missing-modality rate"),
    "av-digits": ("av_digits", "AV-Digits (spoken + written digits): accuracy by modalities present at test time"),
}
