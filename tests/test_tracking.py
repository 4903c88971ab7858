import os

from peftune import config_from_dict, tracking
from peftune.train import run


def _losses(history):
    return [h["loss"] for h in history if "loss" in h]


def test_tensorboard_event_files_hold_the_training_loss(tiny_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tiny_cfg["train"]["report_to"] = ["tensorboard"]
    result = run(config_from_dict(tiny_cfg))
    (log_dir,) = (tmp_path / "run" / "checkpoints" / "runs").iterdir()
    events = EventAccumulator(str(log_dir)).Reload()
    logged = [e.value for e in events.Scalars("train/loss")]
    assert len(logged) == tiny_cfg["train"]["max_steps"]
    assert logged[-1] > 0 and abs(sum(logged) / len(logged) - result.metrics["train_loss"]) < 1e-3


def test_tensorboard_hparams_hold_the_method_its_options_and_the_data(tiny_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    tiny_cfg["train"]["report_to"] = ["tensorboard"]
    tiny_cfg["lora"] = {"r": 4, "target_modules": ["q_proj", "v_proj"]}
    run(config_from_dict(tiny_cfg))
    (log_dir,) = (tmp_path / "run" / "checkpoints" / "runs").iterdir()
    events = EventAccumulator(str(log_dir)).Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["method"].string_value == "lora"
    assert hparams["lora.r"].number_value == 4
    assert hparams["lora.target_modules"].string_value == "q_proj,v_proj"
    assert hparams["data.source"].string_value == tiny_cfg["data"]["source"]
    assert hparams["data.train_examples"].number_value == 12


def test_mlflow_trial_run_is_named_tagged_and_holds_the_loss(tiny_cfg, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    cfg = config_from_dict(tiny_cfg)
    cfg.train.report_to = ["mlflow"]
    with tracking.trial_run(cfg.train, "lr-study", 3,
                            params={"learning_rate": 0.01, "lora.r": 8}) as train_cfg:
        cfg.train = train_cfg
        result = run(cfg)
    assert "MLFLOW_TAGS" not in os.environ and "MLFLOW_EXPERIMENT_NAME" not in os.environ
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("lr-study")
    (mlrun,) = client.search_runs([experiment.experiment_id])
    assert mlrun.info.run_name == "lr-study-trial-0003"
    assert mlrun.data.tags[tracking.STUDY_TAG] == "lr-study"
    assert mlrun.data.tags[tracking.TRIAL_TAG] == "3"
    params = mlrun.data.params
    assert params["method"] == "lora" and params["lora.r"] == "8"
    assert params["lora.target_modules"] == "default" and params["data.validation_examples"] == "4"
    assert params["trial.learning_rate"] == "0.01" and params["trial.lora.r"] == "8"
    assert params["learning_rate"] == "0.01"  # the Trainer's own arguments are still there
    history = client.get_metric_history(mlrun.info.run_id, "loss")
    assert len(history) == tiny_cfg["train"]["max_steps"]
    assert abs(mlrun.data.metrics["train_loss"] - result.metrics["train_loss"]) < 1e-6


def test_each_search_trial_is_one_tagged_mlflow_run(tiny_cfg, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from peftune import search

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    tiny_cfg["train"]["report_to"] = ["mlflow"]
    tiny_cfg["search"] = {"n_trials": 2, "final": False, "eval_examples": 2,
                          "study_name": "tracked", "pruner": "none"}
    search.run(config_from_dict(tiny_cfg))
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    assert sorted(r.data.tags[tracking.TRIAL_TAG] for r in runs) == ["0", "1"]
    assert {r.info.run_name for r in runs} == {"tracked-trial-0000", "tracked-trial-0001"}
