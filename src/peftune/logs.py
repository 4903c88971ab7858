"""What peftune and the libraries under it print: our progress at INFO, theirs at ERROR.

``setup_logging`` imports nothing heavy and runs first; ``setup_libraries`` imports
transformers, datasets and optuna to quiet them, so it runs once a command has checked its
config (help and config errors stay instant).
"""

from __future__ import annotations

import logging
import sys
import warnings


def setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("peftune").setLevel(logging.WARNING if quiet else logging.INFO)
    # peft and transformers announce future API changes that are theirs to make, not ours
    warnings.filterwarnings("ignore", category=FutureWarning)


def show_progress() -> bool:
    """Progress bars are on unless quiet (``-q``; also when logging was never set up)."""
    return logging.getLogger("peftune").isEnabledFor(logging.INFO)


def setup_libraries(quiet: bool) -> None:
    """Library logs at ERROR; transformers' own bars ("Loading weights" on every load) off.

    The Trainer's progress bar is not one of them: ``training_args`` turns it on unless
    quiet. Hub downloads keep their bars unless quiet.
    """
    import datasets
    import huggingface_hub
    import optuna
    import transformers

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING if quiet else optuna.logging.INFO)
    transformers.logging.set_verbosity_error()
    datasets.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if quiet:
        datasets.disable_progress_bars()
    else:
        huggingface_hub.utils.enable_progress_bars()
