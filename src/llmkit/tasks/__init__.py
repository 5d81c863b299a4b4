"""Downstream tasks built on a pretrained backbone: classification (fine-tuning and inference), embeddings."""
