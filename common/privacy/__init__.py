"""Privacy: DP-SGD training, accounting, the secret per-round randomness, the signed ledger and its audits."""
