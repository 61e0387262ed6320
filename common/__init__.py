"""fedfuse's shared concepts: modalities and data, encoders, fusion head, privacy, ledger."""
