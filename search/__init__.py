"""How a sweep runs: planning, Ray Tune assembly, the trial function, MLflow tracking, results and the CLI.

The layers, each importing only those before it: ``layout`` (where a sweep's files
are, finding and reading them), ``algorithms`` / ``trial`` / ``tracking`` /
``monitor`` (searchers and schedulers, the Tune trial, the driver's callbacks),
``plan`` (every check before anything starts), ``sweep`` (running a plan),
``upstream`` (pretraining chained before a sweep), ``results`` / ``study`` (reading
and reporting), and ``cli``. Nothing is imported here, so the CLI starts without Ray.
"""
