"""flora-lightning: federated fine-tuning of CLIP with LoRA adapters on Lightning Fabric."""

__version__ = "0.1.0"
