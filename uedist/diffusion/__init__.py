"""Diffusion: the DDPM schedule and its chains (``schedule``), EMA weights (``ema``), and diffusion purification,
plain and joint-conditional (``purify``). Pure tensor code: no accelerator, no config objects, no files."""
