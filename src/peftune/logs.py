"""What peftune and the libraries under it print: our progress at INFO, theirs at ERROR."""

from __future__ import annotations

import logging
import sys
import warnings


def setup_logging(quiet: bool) -> None:
    import datasets
    import transformers

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("peftune").setLevel(logging.WARNING if quiet else logging.INFO)
    import optuna

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING if quiet else optuna.logging.INFO)
    transformers.logging.set_verbosity_error()
    datasets.logging.set_verbosity_error()
    if quiet:
        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
