"""The application layer: experiments built on the library (nothing in the library imports it).

Modules, each importing only those above it:

- :mod:`~jbptt.experiment.config`: typed YAML configs with dotted overrides and one clear error per problem (no JAX:
  names are checked against :mod:`jbptt.names`, so config errors answer at once);
- :mod:`~jbptt.experiment.build`: config -> task, cell, loss, estimator (with its remat scan), optimizer; the
  run's keys; the float64 scope;
- :mod:`~jbptt.experiment.evaluate`: the evaluation function, evaluators on fixed batches, the gradient-flow profile;
- :mod:`~jbptt.experiment.rundir`: run folders, ``metrics.jsonl`` (and optional TensorBoard event files), summaries,
  machine info, progress output, signals;
- :mod:`~jbptt.experiment.plots`: plots of run folders, PNG/PDF/SVG (and the pyplot helpers every plot uses);
- :mod:`~jbptt.experiment.esn`: the closed-form ESN readout fit (a non-gradient *fitter*);
- :mod:`~jbptt.experiment.loop`: the training loop of a gradient estimator;
- :mod:`~jbptt.experiment.runner`: ``train(cfg)`` (what ``jbptt run`` calls: a fitter of ``FITTERS`` or the loop)
  and ``load_run``;
- :mod:`~jbptt.experiment.compare_report`: the comparison's Markdown tables and plots;
- :mod:`~jbptt.experiment.compare`: the estimator comparison (agreement, cost scaling, learning curves);
- :mod:`~jbptt.experiment.sampling`: text generation from a character-level model;
- :mod:`~jbptt.experiment.sweep_report` and :mod:`~jbptt.experiment.sweep`: ``jbptt sweep``, a config run over a
  grid of overrides and seeds, with its reports.
"""
