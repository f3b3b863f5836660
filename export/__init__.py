"""fedpeft-export: Hugging Face model + LoRA → onnxruntime-training bundle (the only room that needs torch)."""

__version__ = "0.1.0"
