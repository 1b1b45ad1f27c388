"""What the benchmark scripts (``launch/bench/*.py``) share, by concern:

- :mod:`uedist.bench.timing`: the one timing rule (``torch.utils.benchmark.Timer``), FLOP counting, the measured
  GEMM peak, the machine description and :class:`~uedist.bench.timing.Setting` (device, precision, quick);
- :mod:`uedist.bench.fixtures`: synthetic inputs (random batches, a manifest for model builders, a shard set);
- :mod:`uedist.bench.steps`: the training / inference steps the scripts time (classifier, SEM / REM noise,
  D-VAE, UNet);
- :mod:`uedist.bench.reference`: the reference code's SEM / REM δ loop, kept only for the side-by-side speed
  comparison of ``launch/bench/noise.py``;
- :mod:`uedist.bench.report`: Markdown tables, short durations, and the JSON + Markdown writer.

The package sits at the app level: it imports the engine, the engine never imports it, and nothing here is used
by training code. Numbers from these functions are measurements, not results.
"""
