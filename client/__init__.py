"""fedfuse ClientApp: a site's side of the federation (its data, encoders and privacy state stay here)."""
