"""The run directory: round records, the recorder that writes them, checkpoints (atomic,
safetensors), integrity manifests, resume checks and how write failures are reported."""
