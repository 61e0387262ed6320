"""The model: per-modality encoders, the fusion head, the multimodal model and its evaluation."""
