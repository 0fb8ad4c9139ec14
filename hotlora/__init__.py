"""hotlora: one frozen base model kept hot, one LoRA adapter per RL experiment."""

__version__ = "0.1.0"
