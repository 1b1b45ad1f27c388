"""The engine: the map pass and evaluation, and the stages by kind (``attacks/``, ``purifiers/``, ``train/``)."""
