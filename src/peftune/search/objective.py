"""One trial: draw a configuration, wrap the shared base model with a fresh adapter, train
it (reporting to the pruner), score its summaries, and remove the adapter again."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
from transformers import TrainerCallback

from peftune import assembly, checkpoints, devices, models, tracking
from peftune import train as training
from peftune.config import Config, SearchConfig
from peftune.errors import ConfigError, Diverged, Interrupted
from peftune.generation import generate, prompts_of
from peftune.methods import get_method
from peftune.metrics import text_scores
from peftune.rundir import RunDir
from peftune.search.study import DEFAULT_ATTR, KEPT_ATTR, directions, pruner_name

log = logging.getLogger(__name__)


def suggest(trial: optuna.trial.BaseTrial, cfg: Config) -> Config:
    """Draw one configuration: shared training parameters, the method, then its own options.

    Only the chosen method's parameters are drawn, so the space is conditional.
    """
    space = cfg.search.space
    name = trial.suggest_categorical("method", cfg.search.methods)
    batch = trial.suggest_categorical("batch_size", space.batch_size)
    micro = cfg.train.micro_batch_size
    micro = micro if micro == "auto" else math.gcd(batch, micro)
    train = replace(
        cfg.train,
        learning_rate=trial.suggest_float("learning_rate", *space.learning_rate, log=True),
        batch_size=batch,
        micro_batch_size=micro,
        epochs=trial.suggest_categorical("epochs", space.epochs),
        warmup_ratio=trial.suggest_float("warmup_ratio", *space.warmup_ratio),
        weight_decay=trial.suggest_float("weight_decay", *space.weight_decay),
    )
    method = get_method(name)
    options = replace(cfg.methods[name], **method.search_space(trial)) \
        if cfg.search.tune_method_options else cfg.methods[name]
    new = copy.deepcopy(cfg)
    new.method, new.train = name, train
    new.methods[name] = options
    return new


def default_params(cfg: Config) -> dict[str, Any]:
    """The trial parameters :func:`suggest` turns into the configured configuration itself
    (its method, training settings and method options); ConfigError naming the first one
    outside the search space."""
    name, train = cfg.method, cfg.train
    params: dict[str, Any] = {
        "method": name, "batch_size": train.batch_size, "learning_rate": train.learning_rate,
        "epochs": train.epochs, "warmup_ratio": train.warmup_ratio,
        "weight_decay": train.weight_decay}
    if cfg.search.tune_method_options:
        params.update(get_method(name).params_of(cfg.methods[name]))
    drawn = suggest(_InsideOnly(params), cfg)
    if drawn.train != cfg.train or drawn.methods[name] != cfg.methods[name]:
        raise ConfigError("the default configuration is not a point of the search space "
                          f"(its {name} options cannot be drawn as they are)")
    return params


class _InsideOnly(optuna.trial.FixedTrial):
    """A fixed trial that refuses, naming it, a parameter outside its distribution."""

    def _suggest(self, name: str, distribution: optuna.distributions.BaseDistribution) -> Any:
        given = self._params  # what the trial was made with (``params``: what was drawn)
        value = given.get(name)
        try:
            inside = distribution._contains(distribution.to_internal_repr(value))
        except ValueError:  # a categorical value not among the choices
            inside = False
        if name in given and not inside:
            raise ConfigError(f"the default configuration is not in the search space: "
                              f"{name}={value} lies outside {_span(distribution)}")
        return super()._suggest(name, distribution)


def _span(dist: optuna.distributions.BaseDistribution) -> str:
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return f"the choices {list(dist.choices)}"
    return f"[{dist.low:g}, {dist.high:g}]"  # type: ignore[attr-defined]


def queue_default(study: optuna.Study, cfg: Config) -> bool:
    """Queue the configured configuration as a new study's first trial, so the search can only
    return it or one that scored higher on validation. A study that has trials (resumed,
    or shared and started elsewhere) is left as it is. Returns whether a trial was queued."""
    if study.get_trials(deepcopy=False):
        return False
    try:
        params = default_params(cfg)
    except ConfigError as err:
        log.warning("search.start_from_default: %s; the search starts without it", err)
        return False
    study.enqueue_trial(params, user_attrs={DEFAULT_ATTR: True}, skip_if_exists=True)
    return True


# ---------------------------------------------------------------- one trial

def signal_metric(search: SearchConfig) -> str:
    """The evaluation metric a trial reports at each rung: the study's ROUGE key on the signal
    rows (``eval_slice_rougeL``), or the validation loss (also what a search without a pruner
    reports, at the end of each epoch)."""
    if search.prune_signal == "loss" or search.metric == "eval_loss" or \
            pruner_name(search) == "none":
        return "eval_loss"
    return f"eval_{training.SLICE_PREFIX}{search.metric}"


class ReportToTrial(TrainerCallback):
    """Sends ``metric`` (an evaluation metric, see :func:`signal_metric`) to Optuna as the
    intermediate value and stops pruned trials.

    A loss is negated when the study maximizes ROUGE, so the pruner compares in the
    direction of the objective. Every rung's validation loss and ROUGE on the signal rows
    (where computed) are also kept in the trial's user attribute ``rungs``, by step.
    """

    def __init__(self, trial: optuna.Trial, *, metric: str, sign: float) -> None:
        self.trial, self.metric, self.sign, self.pruned_at = trial, metric, sign, None
        self.rungs: dict[str, dict[str, float]] = {}

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None,
                    **kwargs: Any) -> None:
        metrics = metrics or {}
        self.rungs[str(state.global_step)] = {
            key: value for key, value in metrics.items()
            if key == "eval_loss" or key.startswith(f"eval_{training.SLICE_PREFIX}")}
        self.trial.set_user_attr("rungs", self.rungs)
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value):
            return
        self.trial.report(self.sign * value, step=state.global_step)
        if self.trial.should_prune():
            self.pruned_at = state.global_step
            control.should_training_stop = True


class Objective:
    """Trains and scores one configuration on a base model loaded once per worker (one per
    load configuration: k-bit methods get their own quantized base)."""

    def __init__(self, cfg: Config, bases: assembly.Bases, data: assembly.Prepared) -> None:
        self.cfg, self.bases = cfg, bases
        self.keys: dict[tuple, set[str]] = {}
        # trials see a fixed subset: validation rows for ROUGE and the pruner's loss, and
        # optionally fewer training rows (a cheaper fidelity than the final model's)
        val = data.splits["validation"]
        self.eval_ds = val.select(range(min(cfg.search.eval_examples, len(val))))
        train = data.splits["train"]
        n = cfg.search.train_examples
        subset = bool(n and n < len(train))
        if subset:
            train = train.shuffle(seed=cfg.seed).select(range(n))
        # a trial on all training rows can keep its adapter: the final model when it wins
        self.keep_adapters = cfg.search.keep_adapters and not subset
        self.data = dataclasses.replace(data, splits={**data.splits, "train": train,
                                                      "validation": self.eval_ds})

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        cfg = suggest(trial, self.cfg)
        cfg.output_dir = str(RunDir.of(self.cfg).trial(trial.number).path)
        # the pruner's signal at intermediate steps; without a pruner, a trial's only
        # validation loss is the one at the end of each epoch. Pruning is a search's early
        # stopping: trials do not stop on train.early_stopping too.
        pruning = pruner_name(self.cfg.search) != "none"
        cfg.train = replace(cfg.train, save_checkpoints=False, early_stopping=0,
                            eval_steps=self.cfg.search.intermediate_steps if pruning else None,
                            report_to=self.cfg.train.report_to)
        trial.set_user_attr("config", cfg.to_dict())
        base = self.bases.get(cfg)
        keys = self.keys.setdefault(assembly.base_key(cfg), set(base.state_dict()))
        model = assembly.wrap(base, cfg)
        try:
            return self._train_and_score(trial, cfg, model)
        finally:
            base = assembly.unwrap(model)
            self.bases.put(cfg, base)
            devices.free_memory()  # the trial's optimizer state and activations
            if set(base.state_dict()) != keys:
                raise RuntimeError("adapter removal left modules behind in the base model")

    def _reporter(self, trial: optuna.Trial,
                  cfg: Config) -> tuple[ReportToTrial, training.RougeSignal | None]:
        """What reports to the pruner, and the ROUGE signal it reads (None for the loss)."""
        search = self.cfg.search
        metric = signal_metric(search)
        if metric == "eval_loss":
            return ReportToTrial(trial, metric=metric, sign=-1.0 if directions(search)[0] ==
                                 "maximize" else 1.0), None
        return ReportToTrial(trial, metric=metric, sign=1.0), \
            training.RougeSignal.of(cfg, self.data, search.signal_examples)

    def _train_and_score(self, trial: optuna.Trial, cfg: Config, model: Any) -> Any:
        search = self.cfg.search
        reporter, signal = self._reporter(trial, cfg)
        start = time.perf_counter()
        try:
            with tracking.trial_run(cfg.train, trial.study.study_name, trial.number,
                                    params=trial.params) as tracked:
                cfg.train = tracked  # one tracked run per trial, tagged with study and number
                metrics = training.fit(cfg, model, self.data, output_dir=Path(cfg.output_dir),
                                       callbacks=[] if search.second_objective else [reporter],
                                       signal=signal)
        except Diverged as err:
            trial.set_user_attr("reason", str(err))
            raise optuna.TrialPruned(str(err)) from None
        except Interrupted:
            # trials keep no checkpoints: queue the same parameters to run again
            trial.set_user_attr("reason", "interrupted by a signal; queued again")
            trial.study.enqueue_trial(trial.params, skip_if_exists=False)
            raise
        if reporter.pruned_at is not None:
            reason = (f"pruned by {self.cfg.search.pruner} at step {reporter.pruned_at} "
                      f"({reporter.metric})")
            trial.set_user_attr("reason", reason)
            raise optuna.TrialPruned(reason)
        generating = time.perf_counter()
        preds = generate(model, self.data.tokenizer, prompts_of(self.eval_ds), cfg.eval,
                         precision=models.precision(cfg))
        seconds = time.perf_counter() - generating
        rouge, per_doc = text_scores(preds, self.eval_ds["summary"])
        values = {**rouge, "eval_loss": metrics.get("eval_loss", math.nan),
                  "trainable_params": metrics["trainable_parameters"],
                  "train_time": time.perf_counter() - start,  # training and scoring
                  "generation_seconds_per_document": seconds / max(1, len(preds))}
        if search.metric in per_doc:  # for noise-aware ranking (report.within_noise)
            values["document_scores"] = [round(v, 4) for v in per_doc[search.metric]]
        for key, value in values.items():
            trial.set_user_attr(key, value)
        if self.keep_adapters:
            self._keep(trial, cfg, model, metrics)
        first = values[search.metric]
        return (first, values[search.second_objective]) if search.second_objective else first

    def _keep(self, trial: optuna.Trial, cfg: Config, model: Any,
              metrics: dict[str, Any]) -> None:
        """Save the trial's adapter, its training metrics and what shaped its training (the
        fingerprint a resumed run compares), so the final model can be this adapter."""
        run = RunDir.of(cfg)
        model.save_pretrained(run.adapter)
        self.data.tokenizer.save_pretrained(run.adapter)
        run.record_metrics("train", metrics)
        trial.set_user_attr(KEPT_ATTR, checkpoints.fingerprint(
            cfg, len(self.data.splits["train"])))


def load_for_search(cfg: Config) -> tuple[assembly.Bases, assembly.Prepared]:
    """The tokenized splits, and the base models (loaded when a trial first needs them)."""
    data = assembly.prepare(cfg, roles=("train", "validation", "test"))
    return assembly.Bases(data.tokenizer), data
