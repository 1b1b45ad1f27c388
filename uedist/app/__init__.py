"""The top floor, above the engine: the stage registry's users. ``jobs`` (the common start of every launch script
and the one runner of any registered stage), ``stages`` (discovery), ``pipeline`` (studies), ``report``,
``cli`` (the ``uedist`` command) and ``slurm``. Nothing below ``uedist.app`` imports it."""
