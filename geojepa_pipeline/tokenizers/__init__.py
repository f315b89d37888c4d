"""Frozen tokenizers, one per modality: tags (text embeddings), geometry (PolygonGNN), images."""
