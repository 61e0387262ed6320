"""Insight into a run: modality contributions, attention weights, plots and the HTML run report."""
