"""ZO on a subset of the parameters: which ones train (``requires_grad`` marks them), and the layers that add them.

``tuning.py`` the modes (full, LoRA, prefix, head only: ``tuning(model, "lora", r=8)``, the Hydra ``tuning`` group);
``lora.py`` the LoRA layer that adopts a frozen linear map; ``prefix.py`` the attention pre-hook that puts trainable
keys and values before the real tokens. Plain torch and transformers: no Lightning, no Hydra.
"""
