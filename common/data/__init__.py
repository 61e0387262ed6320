"""Data: the modality schema, site folders on disk, samples in memory, synthetic data, partitioning, importers."""
