"""Local federated simulations: scenarios (TOML) and the runner behind `fedfuse simulate`."""
