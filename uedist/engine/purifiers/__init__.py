"""Purifiers (stage kind ``purify``): the ISS / filter baselines, D-VAE, JCDP and plain diffusion; ``common`` is
their shared part."""
