import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FixedTrial, TrialState

from peftune import config_from_dict, load_yaml
from peftune import search as searching
from peftune.card import read_facts
from peftune.errors import ConfigError


@pytest.fixture
def search_cfg(tiny_cfg):
    tiny_cfg["search"] = {"n_trials": 4, "eval_examples": 4, "intermediate_steps": 1,
                          "heartbeat_seconds": 1}
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

    real, calls = searching._rdb_storage, []

    def racy(*args):
        calls.append(args)
        if len(calls) == 1:
            raise IntegrityError("INSERT INTO alembic_version", {}, Exception("UNIQUE"))
        return real(*args)

    monkeypatch.setattr(searching, "_rdb_storage", racy)
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
    assert final["baselines"]["default"] != final["baselines"]["zero-shot"]
    run = tmp_path / "run"
    best = config_from_dict(load_yaml(run / "best.yaml"))  # `peftune train` accepts it
    assert best.train.learning_rate == pytest.approx(study.best_trial.params["learning_rate"])
    assert (run / "final" / "adapter" / "adapter_model.safetensors").is_file()
    assert 0 <= final["test"]["rougeL"] <= 100
    facts = read_facts(run / "final" / "adapter")  # the model card has the test score
    assert facts["metrics"]["test"]["rougeL"] == final["test"]["rougeL"]
    # trial folders are named from trial numbers only, inside the run directory
    made = {p.name for p in (run / "trials").iterdir()} if (run / "trials").exists() else set()
    assert made <= {f"trial-{t.number:04d}" for t in study.trials}
    from peftune import report

    page = report.write(run).read_text()
    assert "optimization history" in page and "data:image/png;base64," in page
    assert page.count("<tr><td>") >= 4
    # rerunning with the same total adds nothing
    study2, _ = searching.run(config_from_dict({**search_cfg, "search": {
        **search_cfg["search"], "final": False}}))
    assert len(study2.trials) == len(study.trials)


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


def test_resuming_with_another_metric_refuses(search_cfg):
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


def test_sigterm_in_a_search_queues_the_running_trial_again(search_cfg, tmp_path):
    search_cfg["search"].update(n_trials=2, final=False)
    search_cfg["train"]["max_steps"] = 200
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(search_cfg))
    cmd, env = _cli(path)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    running = _wait_for_trials(search_cfg, tmp_path, TrialState.RUNNING, 1)
    assert running, "no trial started"
    time.sleep(2)  # inside the training loop
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


def _wait_for_trials(cfg_dict, tmp_path, state, n, timeout=240):
    """The study's trials in ``state`` once there are ``n`` of them ([] on timeout)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(0.5)
        if (tmp_path / "run" / "study.db").exists():
            trials = _study(cfg_dict).get_trials(states=(state,))
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
    assert len(done) == 4
    assert len({t.number for t in done}) == 4
    assert all(t.state != TrialState.RUNNING for t in trials)


def test_killed_search_resumes_without_redoing_trials(search_cfg, tmp_path):
    search_cfg["search"].update(n_trials=4, final=False)
    search_cfg["train"]["max_steps"] = 6
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(search_cfg))
    cmd, env = _cli(path)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_trials(search_cfg, tmp_path, TrialState.COMPLETE, 2)
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


def test_two_workers_share_a_postgresql_study(search_cfg, tmp_path):
    url = os.environ.get("PEFTUNE_TEST_POSTGRES")
    if not url:
        pytest.skip("no PostgreSQL server: scripts/postgres-test-server.sh could not start one "
                    "(it needs Debian's postgresql package)")
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
    search_cfg["search"].update(n_trials=4, final=False)
    if storage == "journal":
        search_cfg["search"]["storage"] = "journal"
    study_file = tmp_path / "run" / ("study.journal" if storage == "journal" else "study.db")
    search_cfg["train"]["max_steps"] = 8
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(search_cfg))
    cmd, env = _cli(path, "--search.workers", "2")
    parent = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, victim = time.time() + 240, None
    while victim is None and time.time() < deadline:
        time.sleep(0.2)
        if study_file.exists() and len(_children(parent.pid)) == 2:
            if len(_study(search_cfg).get_trials(states=(TrialState.RUNNING,))) == 2:
                victim = _children(parent.pid)[0]  # both workers are mid-trial
    assert victim is not None, "no trial started"
    os.kill(victim, signal.SIGKILL)
    assert parent.wait(timeout=300) == 0
    trials = _study(search_cfg).trials
    assert len([t for t in trials if t.state in searching.FINISHED]) == 4
    assert all(t.state != TrialState.RUNNING for t in trials)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed, "the killed worker's trial should be marked failed"
    retried = [t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) in
               {f.number for f in failed}]
    # Optuna retries with the parameters the killed trial had drawn so far (a kill can land
    # between two suggestions); the rest are sampled afresh.
    assert retried and failed[0].params.items() <= retried[0].params.items()


def test_a_trial_worse_than_the_median_is_pruned_early(search_cfg):
    search_cfg["search"].update(n_trials=3, final=False, pruner="median")
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
