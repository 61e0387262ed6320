"""fedfuse ServerApp: aggregates the shared fusion head, checkpoints, writes results and ledgers."""
