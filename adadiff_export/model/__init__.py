"""The model: its configuration, the U-ViT with uncertainty modules, the noise schedule, and checkpoints."""
