"""Attacks (stage kind ``attack``): ``base`` is what every attack shares; one module per method."""
