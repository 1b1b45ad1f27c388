"""Training: the one step loop and checkpointing, the DeepSpeed ZeRO backend, the victim and the DDPM."""
