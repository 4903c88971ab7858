import copy
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FixedTrial, TrialState

from peftune import config_from_dict, load_yaml
from peftune import search as searching
from peftune import train as training
from peftune.card import read_facts
from peftune.errors import ConfigError
from peftune.methods import registry
from peftune.metrics import rouge
from peftune.rundir import RunDir


@pytest.fixture
def search_cfg(tiny_cfg):
    # a trial is stale after 4 missed beats: 12 s, generous for a busy 2-core machine
    tiny_cfg["search"] = {"n_trials": 4, "eval_examples": 4, "intermediate_steps": 1,
                          "heartbeat_seconds": 3}
    return tiny_cfg


def _fixed(**over):
    params = {"method": "lora", "batch_size": 4, "learning_rate": 1e-3, "epochs": 1.0,
              "warmup_ratio": 0.0, "weight_decay": 0.0, "lora.r": 8, "lora.alpha_over_r": 2,
              "lora.dropout": 0.0, "lora.targets": "default"}
    return {**params, **over}


def test_space_is_conditional_and_fills_the_config(search_cfg):
    cfg = config_from_dict(search_cfg)
    drawn = searching.suggest(FixedTrial(_fixed(**{"lora.r": 16, "lora.targets": "attention",
                                                   "batch_size": 8})), cfg)
    assert drawn.method == "lora" and drawn.method_options.r == 16
    assert drawn.method_options.alpha == 32 and drawn.method_options.target_modules == [
        "attention"]
    # effective batch 8 realised as micro-batches of 2 with accumulation
    assert drawn.train.batch_size == 8 and drawn.train.micro_batch_size == 2
    assert cfg.method_options.r == 8, "suggest must not mutate the base config"
    study = optuna.create_study()
    trial = study.ask()
    searching.suggest(trial, cfg)
    assert all(not k.startswith(("adalora.", "ia3.")) for k in trial.params)


def test_method_options_can_stay_as_configured(search_cfg):
    search_cfg["search"]["tune_method_options"] = False
    search_cfg["lora"] = {"r": 16, "alpha": 32, "dropout": 0.05}
    cfg = config_from_dict(search_cfg)
    trial = optuna.create_study().ask()
    drawn = searching.suggest(trial, cfg)
    assert set(trial.params) == {"method", "batch_size", "learning_rate", "epochs",
                                 "warmup_ratio", "weight_decay"}
    assert (drawn.method_options.r, drawn.method_options.alpha,
            drawn.method_options.dropout) == (16, 32, 0.05)


@pytest.mark.parametrize("method", sorted(registry()))
def test_default_params_draw_the_configured_configuration(search_cfg, method):
    search_cfg["method"] = method
    search_cfg["search"]["methods"] = [method]
    search_cfg["train"]["learning_rate"] = 1e-4  # inside the default space [1e-5, 1e-3]
    cfg = config_from_dict(search_cfg)
    params = searching.default_params(cfg)
    drawn = searching.suggest(FixedTrial(params), cfg)
    assert drawn.train == cfg.train and drawn.method_options == cfg.method_options
    assert params["method"] == method and params["learning_rate"] == 1e-4


@pytest.mark.parametrize(("over", "message"), [
    ({"train": {"learning_rate": 5e-2}}, r"learning_rate=0.05 lies outside \[1e-05, 0.001\]"),
    ({"train": {"batch_size": 6}}, r"batch_size=6 lies outside the choices \[4, 8, 16, 32\]"),
    ({"lora": {"r": 16, "alpha": 24}}, r"lora.alpha_over_r=1.5 lies outside the choices"),
])
def test_a_default_outside_the_space_names_the_parameter(search_cfg, over, message):
    search_cfg["train"]["learning_rate"] = 1e-4
    for section, values in over.items():
        search_cfg.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError, match=message):
        searching.default_params(config_from_dict(search_cfg))


def test_a_new_search_starts_from_the_default_configuration(search_cfg, caplog):
    search_cfg["search"].update(n_trials=2, final=False, pruner="none")
    search_cfg["train"]["learning_rate"] = 1e-4
    cfg = config_from_dict(search_cfg)
    study, _ = searching.run(cfg)
    first, second = study.trials
    assert first.user_attrs[searching.DEFAULT_ATTR] is True
    assert first.params == searching.default_params(cfg)
    assert searching.DEFAULT_ATTR not in second.user_attrs and second.params != first.params
    trained = config_from_dict(first.user_attrs["config"])
    assert trained.train.learning_rate == 1e-4 and trained.method_options == cfg.method_options
    # a top-up of the same study queues no second default trial
    more = config_from_dict({**search_cfg, "search": {**search_cfg["search"], "n_trials": 3}})
    study, _ = searching.run(more)
    assert [searching.DEFAULT_ATTR in t.user_attrs for t in study.trials] == [True, False, False]
    # a default outside the space is said once and the search goes on without it
    other = config_from_dict({**search_cfg, "output_dir": str(Path(cfg.output_dir) / "x"),
                              "train": {**search_cfg["train"], "learning_rate": 5e-2}})
    with caplog.at_level(logging.WARNING):
        assert not searching.queue_default(searching.create_study(other), other)
    assert "learning_rate=0.05 lies outside" in caplog.text


def test_bad_space_is_rejected():
    with pytest.raises(ConfigError, match=r"search.space.learning_rate must be \[low, high\]"):
        config_from_dict({"search": {"space": {"learning_rate": [1e-3, 1e-5]}}})
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        config_from_dict({"search": {"methods": ["lora", "nope"]}})


def test_opening_a_fresh_study_database_survives_a_concurrent_schema_race(
        search_cfg, monkeypatch):
    # Two workers creating the same fresh database: the loser's first open hits the
    # winner's half-created schema (seen as a UNIQUE failure on alembic_version).
    from sqlalchemy.exc import IntegrityError

    real, calls = searching.study._rdb_storage, []

    def racy(*args):
        calls.append(args)
        if len(calls) == 1:
            raise IntegrityError("INSERT INTO alembic_version", {}, Exception("UNIQUE"))
        return real(*args)

    monkeypatch.setattr(searching.study, "_rdb_storage", racy)
    storage = searching.storage_for(config_from_dict(search_cfg))
    assert len(calls) == 2 and storage.get_all_studies() == []


def test_an_unreachable_storage_is_one_clear_error(search_cfg):
    search_cfg["search"]["storage"] = "postgresql://nobody@127.0.0.1:9/none"
    with pytest.raises(ConfigError, match="search.storage: cannot open postgresql://"):
        searching.storage_for(config_from_dict(search_cfg))


def test_search_writes_best_config_final_adapter_and_report(search_cfg, tmp_path):
    search_cfg["search"].update(baselines=True, train_examples=8)
    cfg = config_from_dict(search_cfg)
    study, final = searching.run(cfg)
    finished = study.get_trials(states=searching.FINISHED)
    assert len(finished) == 4
    assert set(final["baselines"]) == {"zero-shot", "default"}
    run = tmp_path / "run"
    # every score is the ROUGE of the texts written next to it
    texts = {}
    for name, scores in [("zero-shot", final["baselines"]["zero-shot"]),
                         ("default", final["baselines"]["default"]), ("final", final["test"])]:
        rows = [json.loads(line) for line in (run / name / "predictions.jsonl").open()]
        texts[name] = [r["prediction"] for r in rows]
        expected = rouge(texts[name], [r["reference"] for r in rows])
        assert {k: scores[k] for k in expected} == pytest.approx(expected, abs=1e-4), name
    assert texts["default"] != texts["zero-shot"], "the default configuration trained nothing"
    best = config_from_dict(load_yaml(run / "best.yaml"))  # `peftune train` accepts it
    assert best.train.learning_rate == pytest.approx(study.best_trial.params["learning_rate"])
    assert (run / "final" / "adapter" / "adapter_model.safetensors").is_file()
    facts = read_facts(run / "final" / "adapter")  # the model card has the test score
    assert facts["metrics"]["test"]["rougeL"] == final["test"]["rougeL"]
    # trial folders are named from trial numbers only, inside the run directory
    made = {p.name for p in (run / "trials").iterdir()} if (run / "trials").exists() else set()
    assert made <= {f"trial-{t.number:04d}" for t in study.trials}
    # best against each baseline per test document, kept with the final model's metrics
    comparison = json.loads((run / "final" / "metrics.json").read_text())["comparison"]
    assert comparison == final["comparison"] and comparison["documents"] == 4
    assert comparison["test"]["best"]["rougeL"] == pytest.approx(final["test"]["rougeL"])
    assert comparison["test"]["default"]["rouge1"] == pytest.approx(
        final["baselines"]["default"]["rouge1"])
    examples = [json.loads(line) for line in (run / "final" / "examples.jsonl").open()]
    assert [set(e) for e in examples] == [{"id", "document", "reference", "zero-shot",
                                           "default", "best"}] * 4
    from peftune import report

    page = report.write(run).read_text()
    assert "Validation score per trial" in page and "data:image/png;base64," in page
    assert "best - default configuration" in page and examples[0]["document"][:40] in page
    assert page.count("<tr><td>") >= 4
    # rerunning with the same total adds nothing
    study2, _ = searching.run(config_from_dict({**search_cfg, "search": {
        **search_cfg["search"], "final": False}}))
    assert len(study2.trials) == len(study.trials)


def _weights(adapter: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(adapter / "adapter_model.safetensors")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_trial_on_every_training_row_is_the_final_model_without_training_again(
        search_cfg, tmp_path, monkeypatch):
    # a pruner's rungs (ROUGE of generated summaries) run inside the trials' training
    search_cfg["search"].update(n_trials=2, baselines=True, pruner="median")
    search_cfg["train"]["learning_rate"] = 1e-3  # inside the space: trial 0 is the default
    cfg = config_from_dict(search_cfg)
    trained, real = [], training.run
    monkeypatch.setattr(training, "run", lambda cfg, **kw: trained.append(cfg) or real(cfg, **kw))
    study, final = searching.run(cfg)
    assert trained == [], "the final model and the default were trained again"
    run = RunDir(tmp_path / "run")
    best = study.best_trial.number
    assert final["trial"] == best
    assert _same(_weights(run.final.adapter), _weights(run.trial(best).adapter))
    assert _same(_weights(run.baseline("default").adapter), _weights(run.trial(0).adapter))
    assert read_facts(run.final.adapter)["metrics"]["test"]["rougeL"] == final["test"]["rougeL"]
    # and it is the adapter that training best.yaml (or the default configuration) gives
    again = config_from_dict(load_yaml(run.best_config))
    again.output_dir = str(tmp_path / "again")
    assert _same(_weights(real(again).adapter_dir), _weights(run.final.adapter))
    # a trial on fewer rows than the final model is trained again, as is one told to keep none
    for name, option in (("fewer", {"train_examples": 8}), ("none", {"keep_adapters": False})):
        other = config_from_dict({**search_cfg, "output_dir": str(tmp_path / name), "search": {
            **search_cfg["search"], **option, "baselines": False, "n_trials": 1}})
        searching.run(other)
        assert not RunDir(tmp_path / name).trial(0).adapter.exists()
    assert [str(Path(c.output_dir).relative_to(tmp_path)) for c in trained] == [
        "fewer/final", "none/final"]


def test_tied_top_trials_are_rescored_on_validation_rows_no_trial_saw(search_cfg, tmp_path,
                                                                      monkeypatch):
    from peftune import report
    from peftune.search import ranking

    # 4 validation rows: the trials score the first 2, re-scoring the other 2
    search_cfg["search"].update(n_trials=3, pruner="none", eval_examples=2, rescore_examples=5)
    search_cfg["train"]["learning_rate"] = 1e-3

    def all_tied(study):
        done = sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: -t.value)
        return done[0], done[1:]

    monkeypatch.setattr(ranking, "within_noise", all_tied)
    study, final = searching.run(config_from_dict(search_cfg))
    found = study.user_attrs[searching.RESCORED]
    assert found["rows"] == 2 and set(found["scores"]) == {"0", "1", "2"}
    for number, fresh in found["scores"].items():
        own = study.trials[int(number)].user_attrs["document_scores"]
        assert len(fresh) == 2 and found["means"][number] == pytest.approx(
            sum(own + fresh) / 4, abs=1e-3)
    chosen = max(found["means"], key=found["means"].get)
    assert found["chosen"] == final["trial"] == int(chosen)
    run = RunDir(tmp_path / "run")
    assert _same(_weights(run.final.adapter), _weights(run.trial(int(chosen)).adapter))
    assert f"The search's choice is trial {chosen}" in report.noise_sentence(study)
    # the choice is kept: a rerun neither scores again nor chooses otherwise
    monkeypatch.setattr(ranking, "_scores", lambda *a, **k: pytest.fail("scored again"))
    _, again = searching.run(config_from_dict(search_cfg))
    assert again["trial"] == final["trial"]
    # a study topped up is re-scored: only its new trial generates, and it can be chosen
    scored = []
    monkeypatch.setattr(ranking, "_scores", lambda cfg, t, *a: scored.append(t.number) or
                        [100.0, 100.0])
    search_cfg["search"]["n_trials"] = 4
    study, more = searching.run(config_from_dict(search_cfg))
    assert scored == [3] and more["trial"] == 3 == study.user_attrs[searching.RESCORED]["chosen"]


def test_absurd_learning_rate_is_pruned_with_a_reason(search_cfg):
    search_cfg["search"].update(n_trials=1, final=False)
    search_cfg["train"].update(max_grad_norm=1e9, max_steps=8)
    cfg = config_from_dict(search_cfg)
    study = searching.create_study(cfg)
    study.enqueue_trial(_fixed(learning_rate=1e6))
    searching.run(cfg)
    trial = study.trials[0]
    assert trial.state == TrialState.PRUNED
    assert "diverged" in trial.user_attrs["reason"]


def test_trial_scores_do_not_depend_on_earlier_trials(search_cfg):
    search_cfg["search"].update(n_trials=3, final=False, pruner="none")
    cfg = config_from_dict(search_cfg)
    study = searching.create_study(cfg)
    probe = _fixed(learning_rate=5e-3, **{"lora.dropout": 0.1})
    study.enqueue_trial(probe)
    study.enqueue_trial(_fixed(learning_rate=2e-2, **{"lora.r": 4, "lora.targets": "all-linear"}))
    study.enqueue_trial(probe, skip_if_exists=False)
    searching.run(cfg)
    first, _, last = study.trials
    assert first.params == last.params
    for key in ("eval_loss", "rougeL", "rouge1"):
        assert first.user_attrs[key] == pytest.approx(last.user_attrs[key], abs=1e-6)


@pytest.mark.parametrize(("pruner", "eval_steps"), [("none", None), ("median", 1)])
def test_trials_compute_intermediate_validation_loss_only_for_a_pruner(search_cfg, monkeypatch,
                                                                       pruner, eval_steps):
    search_cfg["search"].update(n_trials=1, final=False, pruner=pruner)
    fit, seen = training.fit, []

    def recording(cfg, *args, **kwargs):
        seen.append(cfg.train.eval_steps)
        return fit(cfg, *args, **kwargs)

    monkeypatch.setattr(training, "fit", recording)
    study, _ = searching.run(config_from_dict(search_cfg))
    assert seen == [eval_steps] and study.trials[0].state == TrialState.COMPLETE


def test_resuming_with_another_question_refuses(search_cfg, tmp_path):
    searching.create_study(config_from_dict(search_cfg))
    search_cfg["search"]["metric"] = "rouge2"
    with pytest.raises(ConfigError, match="different metric"):
        searching.create_study(config_from_dict(search_cfg))
    search_cfg["search"]["metric"] = "eval_loss"  # another direction too
    with pytest.raises(ConfigError, match="different metric"):
        searching.create_study(config_from_dict(search_cfg))
    search_cfg["search"]["metric"] = "rougeL"
    search_cfg["search"].setdefault("space", {})["learning_rate"] = [1e-4, 1e-2]
    with pytest.raises(ConfigError, match="different space"):
        searching.create_study(config_from_dict(search_cfg))
    del search_cfg["search"]["space"]
    searching.create_study(config_from_dict(search_cfg))  # the same question again: fine
    for section, key, value, name in [
            ("model", "name", str(tmp_path / "other-model"), "model"),
            ("data", "source", str(tmp_path / "other-data"), "data"),
            ("search", "methods", ["lora", "ia3"], "methods")]:
        changed = copy.deepcopy(search_cfg)
        changed[section][key] = value
        with pytest.raises(ConfigError, match=f"created with a different {name} "):
            searching.create_study(config_from_dict(changed))
    assert len(searching.create_study(config_from_dict(search_cfg)).trials) == 0


def test_sigterm_in_a_search_queues_the_running_trial_again(search_cfg, tmp_path):
    search_cfg["search"].update(n_trials=2, final=False)
    search_cfg["train"]["max_steps"] = 200
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(search_cfg))
    cmd, env = _cli(path)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    # a reported validation loss: the trial is inside the training loop, its handler set
    running = _wait_for_trials(search_cfg, tmp_path, TrialState.RUNNING, 1, training=True)
    assert running, "no trial started training"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-1000:]
    trials = _study(search_cfg).trials
    stopped = trials[running[0].number]
    assert stopped.state != TrialState.RUNNING
    assert stopped.user_attrs["reason"] == "interrupted by a signal; queued again"
    queued = [t for t in trials if t.state == TrialState.WAITING]
    assert queued and queued[0].system_attrs["fixed_params"] == stopped.params


def _cli(cfg_path, *extra):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return [sys.executable, "-m", "peftune", "-q", "search", "--config", str(cfg_path),
            *extra], env


def _study(cfg_dict):
    cfg = config_from_dict(cfg_dict)
    return searching.create_study(cfg)


def _wait_for_trials(cfg_dict, tmp_path, state, n, timeout=240, training=False):
    """The study's trials in ``state`` once there are ``n`` of them ([] on timeout); with
    ``training``, only trials that reported a validation loss (inside the training loop)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(0.2)
        if (tmp_path / "run" / "study.db").exists():
            trials = [t for t in _study(cfg_dict).get_trials(states=(state,))
                      if t.intermediate_values or not training]
            if len(trials) >= n:
                return trials
    return []


def test_two_workers_share_one_study_without_duplicates(search_cfg, tmp_path):
    search_cfg["search"].update(n_trials=4, final=False)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(search_cfg))
    cmd, env = _cli(path, "--search.workers", "2")
    subprocess.run(cmd, env=env, check=True, timeout=300)
    trials = _study(search_cfg).trials
    done = [t for t in trials if t.state in searching.FINISHED]
    assert len(done) == 4 and len(trials) == 4, "a trial was run twice or one too many"
    # each worker samples its own stream: workers sharing a seed would draw the same trials
    assert len({json.dumps(t.params, sort_keys=True) for t in done}) == 4
    assert all(t.state != TrialState.RUNNING for t in trials)


def test_killed_search_resumes_without_redoing_trials(search_cfg, tmp_path):
    search_cfg["search"].update(n_trials=4, final=False)
    search_cfg["train"]["max_steps"] = 6
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(search_cfg))
    cmd, env = _cli(path)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_trials(search_cfg, tmp_path, TrialState.COMPLETE, 2)
    # the kill lands anywhere in the third trial: before it exists, before its first
    # heartbeat (test_a_search_killed_before_its_trials_first_heartbeat_resumes pins that
    # instant), while training or scoring; every one must resume the same way
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {t.number: t.values for t in _study(search_cfg).get_trials(
        states=(TrialState.COMPLETE,))}
    assert len(before) >= 2
    subprocess.run(cmd, env=env, check=True, timeout=300)
    trials = _study(search_cfg).trials
    after = {t.number: t.values for t in trials if t.state == TrialState.COMPLETE}
    assert {n: after[n] for n in before} == before, "completed trials were redone"
    assert len([t for t in trials if t.state in searching.FINISHED]) == 4
    assert all(t.state != TrialState.RUNNING for t in trials)
    for dead in (t.number for t in trials if t.state == TrialState.FAIL):
        _assert_retried_and_complete(search_cfg, dead, 4)


def _die_in_study(cfg_dict, tmp_path, code):
    """Run ``code`` in a process that opens the study as ``study`` and kills itself with
    SIGKILL where ``code`` says; returns once it is dead."""
    script = tmp_path / "die.py"
    script.write_text(
        "import json, os, signal, sys\n"
        "from peftune import config_from_dict, search\n"
        "cfg = config_from_dict(json.loads(sys.argv[1]))\n"
        "study = search.create_study(cfg)\n"
        "die = lambda *_: os.kill(os.getpid(), signal.SIGKILL)\n" + code + "\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, str(script), json.dumps(cfg_dict)], env=env,
                          stderr=subprocess.PIPE, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]


def _assert_retried_and_complete(cfg_dict, dead, n):
    trials = _study(cfg_dict).trials
    assert trials[dead].state == TrialState.FAIL
    retried = [t for t in trials
               if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == dead]
    assert len(retried) == 1 and retried[0].state in searching.FINISHED
    assert len([t for t in trials if t.state in searching.FINISHED]) == n
    assert all(t.state != TrialState.RUNNING for t in trials)


def test_a_search_killed_before_its_trials_first_heartbeat_resumes(search_cfg, tmp_path):
    # the instant that once hung the rerun: the trial is RUNNING in the study, and its
    # process dies before the heartbeat thread beats once (and before it records an owner)
    search_cfg["search"].update(n_trials=2, final=False, heartbeat_seconds=1)
    _die_in_study(search_cfg, tmp_path, "study.ask(); die()")
    trials = _study(search_cfg).trials
    assert [t.state for t in trials] == [TrialState.RUNNING]
    assert searching.owner_of(trials[0]) is None
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(search_cfg))
    cmd, env = _cli(path)
    subprocess.run(cmd, env=env, check=True, timeout=240)
    _assert_retried_and_complete(search_cfg, 0, 2)


def test_a_trial_whose_process_died_is_requeued_without_waiting_for_the_grace(search_cfg,
                                                                              tmp_path):
    # 4 x 100 s of grace: only the dead owner's pid can requeue the trial within the timeout
    search_cfg["search"].update(n_trials=1, final=False, heartbeat_seconds=100)
    _die_in_study(search_cfg, tmp_path, "search.optimize(cfg, study, die)")
    trials = _study(search_cfg).trials
    assert [t.state for t in trials] == [TrialState.RUNNING]
    assert searching.owner_of(trials[0])["pid"] != os.getpid()
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(search_cfg))
    cmd, env = _cli(path)
    subprocess.run(cmd, env=env, check=True, timeout=200)
    _assert_retried_and_complete(search_cfg, 0, 1)


@pytest.mark.parametrize("storage", ["sqlite", "journal", "postgresql"])
def test_stale_trials_are_the_silent_ones_and_those_of_dead_owners(search_cfg, storage):
    search_cfg["search"].update(heartbeat_seconds=2)  # stale after 8 s
    if storage == "journal":
        search_cfg["search"]["storage"] = "journal"
    if storage == "postgresql":
        url = os.environ.get("PEFTUNE_TEST_POSTGRES")
        if not url:
            pytest.skip("no PostgreSQL server (PEFTUNE_TEST_POSTGRES)")
        search_cfg["search"].update(storage=url, study_name=f"stale-{time.time_ns()}")
    study = searching.create_study(config_from_dict(search_cfg))
    try:
        _never, beating, orphan = study.ask(), study.ask(), study.ask()
        study._storage.record_heartbeat(beating._trial_id)
        gone = subprocess.Popen(["true"])
        gone.wait()
        study._storage.set_trial_system_attr(orphan._trial_id,
                                             searching.study._owner_key(orphan._trial_id),
                                             {**searching.me(), "pid": gone.pid})
        optuna.storages.fail_stale_trials(study)
        # at once: only the trial whose process is gone
        assert [t.state for t in study.trials] == [TrialState.RUNNING] * 2 + [
            TrialState.FAIL, TrialState.WAITING]
        deadline = time.time() + 60
        while study.trials[0].state == TrialState.RUNNING and time.time() < deadline:
            study._storage.record_heartbeat(beating._trial_id)
            time.sleep(0.5)
            optuna.storages.fail_stale_trials(study)
        # the one that never beat went stale after the grace, counted from its start
        states = [t.state for t in study.trials]
        assert states[:2] == [TrialState.FAIL, TrialState.RUNNING], states
        assert RetryHeartbeatStaleTrialCallback.retried_trial_number(study.trials[-1]) == 0
    finally:
        if storage == "postgresql":
            optuna.delete_study(study_name=study.study_name, storage=url)


def test_owner_gone_tells_a_dead_or_reused_pid_from_a_live_one():
    me = searching.me()
    assert not searching.owner_gone(me), "this process never judges its own trials"
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        alive = {**me, "pid": sleeper.pid, "started": searching.study._process_start(sleeper.pid)}
        assert not searching.owner_gone(alive)
        # the same pid, started at another time: the owner died and its pid was reused
        assert searching.owner_gone({**alive, "started": alive["started"] - 100})
        # another host's pids say nothing here: only the heartbeat tells
        assert not searching.owner_gone({**alive, "host": "elsewhere", "pid": 1 << 30})
    finally:
        sleeper.kill()
        sleeper.wait()
    assert searching.owner_gone(alive)
    assert not searching.owner_gone(None)


def test_a_search_waiting_on_another_process_says_for_whom_and_how_long(search_cfg, caplog):
    # a live process on this host owns a trial that never beats; it dies once the search has
    # said it waits, and its trial is requeued at once. The grace (20 s) only has to outlast
    # the few storage calls before the first wait, however slow the machine is then.
    search_cfg["search"].update(n_trials=1, final=False, heartbeat_seconds=5)
    cfg = config_from_dict(search_cfg)
    study = searching.create_study(cfg)
    sleeper = subprocess.Popen(["sleep", "600"])
    said = []

    class OwnerDiesWhenWaitedFor(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("waiting for"):
                said.append(record.getMessage())
                sleeper.kill()
                sleeper.wait()

    handler = OwnerDiesWhenWaitedFor()
    logging.getLogger("peftune.search").addHandler(handler)
    try:
        trial = study.ask()
        owner = {**searching.me(), "pid": sleeper.pid,
                 "started": searching.study._process_start(sleeper.pid)}
        study._storage.set_trial_system_attr(trial._trial_id,
                                             searching.study._owner_key(trial._trial_id), owner)
        caplog.set_level("INFO", logger="peftune.search")
        searching.optimize(cfg, study, lambda trial: 0.5)
    finally:
        logging.getLogger("peftune.search").removeHandler(handler)
        sleeper.kill()
        sleeper.wait()
    assert len(said) == 1 and f"trial 0 ({owner['host']}:{sleeper.pid}), stale in " in said[0]
    assert int(said[0].split("stale in ")[1].split()[0]) <= 20
    _assert_retried_and_complete(search_cfg, 0, 1)


def test_two_workers_share_a_postgresql_study(search_cfg, tmp_path):
    url = os.environ.get("PEFTUNE_TEST_POSTGRES")
    if not url:
        reason = ("no PostgreSQL server: scripts/postgres-test-server.sh could not start one "
                  "(it needs Debian's postgresql package)")
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run this test")  # a skip would keep CI green
        pytest.skip(reason)
    name = f"test-{os.getpid()}-{time.time_ns()}"
    search_cfg["search"].update(n_trials=4, final=False, storage=url, study_name=name)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(search_cfg))
    cmd, env = _cli(path, "--search.workers", "2")
    try:
        subprocess.run(cmd, env=env, check=True, timeout=300)
        trials = optuna.load_study(study_name=name, storage=url).trials
        done = [t for t in trials if t.state in searching.FINISHED]
        assert len(done) == 4 and all(t.state != TrialState.RUNNING for t in trials)
        assert not (tmp_path / "run" / "study.db").exists()
    finally:
        optuna.delete_study(study_name=name, storage=url)


def _children(pid):
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_a_killed_worker_trial_is_retried_and_the_study_completes(search_cfg, tmp_path, storage):
    # the killed workers' trials are requeued once their pids are seen gone; a trial killed
    # before it recorded its owner waits for the grace, shorter (8 s) here
    search_cfg["search"].update(n_trials=2, final=False, heartbeat_seconds=2)
    if storage == "journal":
        search_cfg["search"]["storage"] = "journal"
    study_file = tmp_path / "run" / ("study.journal" if storage == "journal" else "study.db")
    # long enough that a poll of the study finds a trial training on a loaded machine
    search_cfg["train"]["max_steps"] = 30
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(search_cfg))
    cmd, env = _cli(path, "--search.workers", "2")
    parent = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers, training = [], []
    try:
        deadline = time.time() + 240
        while not training and time.time() < deadline and parent.poll() is None:
            time.sleep(0.2)
            workers = _children(parent.pid)
            if study_file.exists() and len(workers) == 2:
                # a reported validation loss: every parameter of that trial is drawn
                training = [t for t in _study(search_cfg).get_trials(
                    states=(TrialState.RUNNING,)) if t.intermediate_values]
        assert training, "no trial got to training"
        for pid in workers:  # the parent tops the study up once its workers are gone
            os.kill(pid, signal.SIGKILL)
        assert parent.wait(timeout=300) == 0
    finally:
        _kill_leftovers(workers)
        parent.kill()
    trials = _study(search_cfg).trials
    assert len([t for t in trials if t.state in searching.FINISHED]) == 2
    assert all(t.state != TrialState.RUNNING for t in trials)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed, "the killed worker's trial should be marked failed"
    assert {t.number for t in training} <= {t.number for t in failed}
    for killed in failed:
        retried = [t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t)
                   == killed.number]
        assert len(retried) == 1 and retried[0].state in searching.FINISHED
        if killed.number in {t.number for t in training}:
            # README: a dead worker's trial runs again with the same parameters
            assert retried[0].params == killed.params
        else:  # killed between two suggestions: what was drawn is kept, the rest drawn anew
            assert killed.params.items() <= retried[0].params.items()


def test_a_trial_worse_than_the_median_is_pruned_early(search_cfg):
    search_cfg["search"].update(n_trials=3, final=False, pruner="median", prune_signal="loss")
    search_cfg["train"]["max_steps"] = 6
    cfg = config_from_dict(search_cfg)
    study = searching.create_study(cfg)
    good = _fixed(learning_rate=1e-3, **{"lora.targets": "all-linear"})
    study.enqueue_trial({**good, "learning_rate": 2e-2})
    study.enqueue_trial({**good, "learning_rate": 3e-2})
    study.enqueue_trial({**good, "learning_rate": 1e-5})
    searching.run(cfg)
    bad = study.trials[2]
    assert bad.state == TrialState.PRUNED
    assert bad.user_attrs["reason"].startswith("pruned by median at step")
    assert max(bad.intermediate_values) < 6


def test_the_median_pruner_acts_on_rouge_of_the_signal_rows(search_cfg, monkeypatch):
    search_cfg["search"].update(n_trials=3, final=False, pruner="median", prune_signal="rouge",
                                signal_examples=2)
    search_cfg["train"]["max_steps"] = 4
    rows = []

    def scripted(model, tokenizer, ds, settings, **kwargs):
        # a stand-in for generation + ROUGE: rank 8 summarizes well, rank 4 badly
        rows.append(len(ds))
        value = 40.0 if model.peft_config["default"].r == 8 else 5.0
        return dict.fromkeys(("rouge1", "rouge2", "rougeL", "rougeLsum"), value)

    monkeypatch.setattr(training, "score", scripted)
    cfg = config_from_dict(search_cfg)
    study = searching.create_study(cfg)
    for r in (8, 8, 4):
        study.enqueue_trial(_fixed(**{"lora.r": r}), skip_if_exists=False)
    searching.run(cfg)
    good, _, bad = study.trials
    assert good.state == TrialState.COMPLETE and good.intermediate_values == {
        1: 40.0, 2: 40.0, 3: 40.0, 4: 40.0}
    assert bad.state == TrialState.PRUNED and bad.intermediate_values == {1: 5.0}
    assert bad.user_attrs["reason"] == "pruned by median at step 1 (eval_slice_rougeL)"
    assert set(rows) == {2}
    # each rung keeps the validation loss next to the signal
    assert good.user_attrs["rungs"]["3"]["eval_slice_rougeL"] == 40.0
    assert good.user_attrs["rungs"]["3"]["eval_loss"] > 0


def test_real_rouge_of_generated_summaries_is_the_intermediate_value(search_cfg):
    search_cfg["search"].update(n_trials=1, final=False, pruner="median", signal_examples=2)
    search_cfg["train"]["max_steps"] = 2
    cfg = config_from_dict(search_cfg)
    assert cfg.search.prune_signal == "rouge"  # the default
    study, _ = searching.run(cfg)
    (trial,) = study.trials
    assert sorted(trial.intermediate_values) == [1, 2]
    for step, value in trial.intermediate_values.items():
        assert 0 <= value <= 100
        assert value == trial.user_attrs["rungs"][str(step)]["eval_slice_rougeL"]


def test_an_eval_loss_study_prunes_on_loss_whatever_the_signal():
    cfg = config_from_dict({"search": {"metric": "eval_loss", "prune_signal": "rouge"}})
    assert searching.signal_metric(cfg.search) == "eval_loss"
    cfg = config_from_dict({"search": {"metric": "rouge2"}})
    assert searching.signal_metric(cfg.search) == "eval_slice_rouge2"


@pytest.mark.parametrize(("data", "message"), [
    ({"search": {"prune_signal": "bleu"}}, "search.prune_signal must be one of"),
    ({"search": {"signal_examples": 0}}, r"search.signal_examples must be in \[1, "),
])
def test_bad_signal_options_name_the_flag(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def _first_params(cfg, worker):
    trial = searching.create_study(cfg, worker=worker).ask()
    searching.suggest(trial, cfg)
    return trial.params


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_parallel_workers_draw_their_own_reproducible_trials(search_cfg, tmp_path, sampler):
    search_cfg["search"]["sampler"] = sampler
    cfg = config_from_dict(search_cfg)
    one, two = _first_params(cfg, 1), _first_params(cfg, 2)  # sharing one study
    assert one != two
    again = config_from_dict({**search_cfg, "output_dir": str(tmp_path / "again")})
    assert _first_params(again, 1) == one
    assert searching.sampler_seed(cfg.seed, 0) == cfg.seed  # a single process: as before


def _alive(pid):
    """Whether ``pid`` runs (a zombie whose new parent has not reaped it does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _wait_for_workers_in_training(parent, cfg_dict, study_file, timeout=240):
    """The two workers' pids and their RUNNING trials, once both report training losses."""
    deadline = time.time() + timeout
    while time.time() < deadline and parent.poll() is None:
        time.sleep(0.2)
        workers = _children(parent.pid)
        if study_file.exists() and len(workers) == 2:
            running = _study(cfg_dict).get_trials(states=(TrialState.RUNNING,))
            if len(running) == 2 and all(t.intermediate_values for t in running):
                return workers, running
    raise AssertionError("the workers never got to training")


def _kill_leftovers(pids):
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_sigterm_to_a_multi_worker_search_stops_its_workers_and_queues_their_trials(
        search_cfg, tmp_path):
    search_cfg["search"].update(n_trials=4, final=False)
    search_cfg["train"]["max_steps"] = 200
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(search_cfg))
    cmd, env = _cli(path, "--search.workers", "2")
    parent = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    workers = []
    try:
        workers, running = _wait_for_workers_in_training(parent, search_cfg,
                                                         tmp_path / "run" / "study.db")
        parent.send_signal(signal.SIGTERM)
        _, err = parent.communicate(timeout=180)
        assert parent.returncode == 130, err[-1000:]
        assert "workers' running trials are queued again" in err.strip().splitlines()[-1]
        assert not [pid for pid in workers if _alive(pid)], "workers outlived the search"
    finally:
        _kill_leftovers(workers)
        parent.kill()
    trials = _study(search_cfg).trials
    assert all(t.state != TrialState.RUNNING for t in trials)
    stopped = [trials[t.number] for t in running]
    assert all(t.user_attrs["reason"] == "interrupted by a signal; queued again" for t in stopped)
    queued = [t.system_attrs["fixed_params"] for t in trials if t.state == TrialState.WAITING]
    assert sorted(map(str, queued)) == sorted(str(t.params) for t in stopped)


def test_workers_of_a_killed_search_finish_their_trial_and_take_no_new_one(search_cfg,
                                                                          tmp_path):
    search_cfg["search"].update(n_trials=8, final=False, pruner="none")
    search_cfg["train"]["max_steps"] = 30
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(search_cfg))
    cmd, env = _cli(path, "--search.workers", "2")
    parent = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        workers, running = _wait_for_workers_in_training(parent, search_cfg,
                                                         tmp_path / "run" / "study.db")
        parent.kill()
        parent.wait()
        deadline = time.time() + 240
        while [pid for pid in workers if _alive(pid)] and time.time() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in workers if _alive(pid)], "orphaned workers kept going"
    finally:
        _kill_leftovers(workers)
    trials = _study(search_cfg).trials
    assert all(trials[t.number].state == TrialState.COMPLETE for t in running), \
        "an orphaned worker did not finish its trial"
    assert all(t.state != TrialState.RUNNING for t in trials)
    assert len([t for t in trials if t.state in searching.FINISHED]) < 8, \
        "orphaned workers took new trials"


def test_hyperband_the_default_pruner_runs_and_prunes_with_a_reason(search_cfg):
    assert config_from_dict({}).search.pruner == "hyperband"
    search_cfg["search"].update(n_trials=6, final=False, prune_signal="loss")  # default pruner
    search_cfg["train"]["max_steps"] = 6
    cfg = config_from_dict(search_cfg)
    assert cfg.search.pruner == "hyperband"
    study = searching.create_study(cfg)
    assert isinstance(study.pruner, optuna.pruners.HyperbandPruner)
    good = _fixed(learning_rate=2e-2, **{"lora.targets": "all-linear"})
    for lr in (2e-2, 3e-2, 1e-5, 1e-5, 2e-5, 1e-5):
        study.enqueue_trial({**good, "learning_rate": lr}, skip_if_exists=False)
    searching.run(cfg)
    trials = study.trials
    assert [t.state for t in trials if t.state not in searching.FINISHED] == []
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, "hyperband pruned nothing"
    for t in pruned:
        assert t.user_attrs["reason"].startswith("pruned by hyperband at step")
        assert t.params["learning_rate"] < 1e-4 and max(t.intermediate_values) < 6
    assert all(t.params["learning_rate"] > 1e-2 for t in trials[:2])
    assert all(t.state == TrialState.COMPLETE for t in trials[:2])


def test_pareto_search_retrains_a_front_trial_on_train_and_validation(search_cfg, tmp_path,
                                                                      monkeypatch):
    from peftune import report

    search_cfg["search"].update(n_trials=3, second_objective="trainable_params",
                                final_on="train+validation")
    cfg = config_from_dict(search_cfg)
    study = searching.create_study(cfg)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    for r, lr in ((4, 2e-2), (32, 2e-2), (8, 1e-5)):
        study.enqueue_trial(_fixed(learning_rate=lr, **{"lora.r": r}))
    trained_on = []
    real_run = training.run

    def spy(cfg, **kwargs):  # the real training; only the rows it got are noted
        trained_on.append((cfg.output_dir, len(kwargs["data"].splits["train"])))
        return real_run(cfg, **kwargs)

    monkeypatch.setattr(training, "run", spy)
    _, final = searching.run(cfg)
    trials = study.trials
    assert all(t.state == TrialState.COMPLETE for t in trials)  # no pruning in a Pareto search
    for t in trials:
        assert t.values == [t.user_attrs["rougeL"], t.user_attrs["trainable_params"]]
    params = sorted({t.values[1] for t in trials})
    assert len(params) == 3  # rank 4, 8 and 32: three sizes of adapter
    front = study.best_trials
    dominated = [t for t in trials if any(
        o.values[0] >= t.values[0] and o.values[1] <= t.values[1] and o.values != t.values
        for o in trials)]
    assert {t.number for t in front} == {t.number for t in trials} - {t.number for t in
                                                                      dominated}
    chosen = max(front, key=lambda t: t.values[0])
    assert final["trial"] in {t.number for t in front}
    assert study.trials[final["trial"]].values[0] == chosen.values[0]
    best = load_yaml(tmp_path / "run" / "best.yaml")
    assert best["lora"]["r"] == study.trials[final["trial"]].params["lora.r"]
    # final_on train+validation: the final model saw the 12 training and 4 validation rows
    assert trained_on == [(str(tmp_path / "run" / "final"), 16)]
    page = report.write(tmp_path / "run").read_text()
    assert "<h3>Pareto front</h3>" in page and "alt='Pareto front'" in page
    assert (tmp_path / "run" / "report" / "pareto_front.png").stat().st_size > 1000


def test_one_seed_gives_the_same_digits_in_two_runs(search_cfg, tmp_path):
    """The same seed and settings twice: bitwise the same trials (every validation
    document's score), final adapter and test texts; the run records what else decides
    its digits (precision, threads, device)."""
    from safetensors.torch import load_file

    search_cfg["search"].update(n_trials=2, pruner="none")
    runs = []
    for name in ("one", "two"):
        cfg = config_from_dict({**search_cfg, "output_dir": str(tmp_path / name)})
        study, final = searching.run(cfg)
        runs.append((study, tmp_path / name / "final"))
    (first, final_one), (second, final_two) = runs
    for a, b in zip(first.trials, second.trials, strict=True):
        assert a.params == b.params and a.values == b.values
        assert a.user_attrs["document_scores"] == b.user_attrs["document_scores"]
        assert len(a.user_attrs["document_scores"]) == 4 and "loop_rate" in a.user_attrs
        assert a.user_attrs["generation_seconds_per_document"] > 0
    one, two = (load_file(str(d / "adapter" / "adapter_model.safetensors"))
                for d in (final_one, final_two))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert (final_one / "predictions.jsonl").read_text() == \
        (final_two / "predictions.jsonl").read_text()
    numerics = json.loads((final_one / "metrics.json").read_text())["numerics"]
    assert numerics["threads"] == torch.get_num_threads() and numerics["precision"]


def test_rescoring_takes_the_top_four_tied_trials_and_the_default_with_kept_adapters(tmp_path):
    from peftune.search import ranking
    from peftune.search.study import KEPT_ATTR

    run = RunDir(tmp_path)
    trials = []
    for number in range(7):
        attrs = {KEPT_ATTR: {"seed": 42}, **({searching.DEFAULT_ATTR: True} if number == 6
                                              else {})}
        trial = optuna.trial.create_trial(value=30.0 - number, user_attrs=attrs)
        trial.number = number
        trials.append(trial)
        if number != 2:  # trial 2 kept no adapter (another machine's disk)
            run.trial(number).adapter.mkdir(parents=True)
    picked = ranking._candidates(trials[0], trials[1:], run=run)
    assert [t.number for t in picked] == [0, 1, 3, 4, 6]  # the default's trial 6 too
    # without the best's adapter, the best would not be among them: no re-scoring then
    assert ranking._candidates(trials[2], trials[3:], run=run)[0].number == 3
