"""Frozen ViT backbones (timm), local weights, fingerprints, the shipped offline ViT."""

from .factory import SHIPPED, create_backbone, shipped_config, fingerprint, load_weights_file, structural_config

__all__ = ["SHIPPED", "create_backbone", "shipped_config", "fingerprint", "load_weights_file", "structural_config"]
