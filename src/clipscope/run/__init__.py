"""The run directory: its files' format, written and read in one place; environment capture.

* :mod:`clipscope.run.directory` -- ``epochs.csv`` (columns), component files,
  checkpoints, ``summary.json``: :class:`~clipscope.run.directory.RunDirectory`
  writes them, :func:`~clipscope.run.directory.load_run` reads them back;
* :mod:`clipscope.run.study` -- a study folder (``study.json``) of run directories;
* :mod:`clipscope.run.env` -- ``env.json``: versions, device, the conventions
  that change a component gradient.

This layer knows files, not training: the loop (:mod:`clipscope.loop`) and the
report (:mod:`clipscope.report`) both stand on it. Nothing is imported here.
"""
