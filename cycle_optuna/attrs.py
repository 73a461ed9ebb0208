"""The names of what cycle-optuna stores in a study's and a trial's Optuna user attrs.

One place for every module that reads or writes them; pure Python, so queries import no torch.
"""

CONFIG_ATTR = "cycle_optuna_config"  # study: the study file's settings, storage URL without its password
STATS_ATTR = "data_stats"  # study: the normalisation statistics and shapes predict() needs on new data
MODEL_ATTR = "model_artifact_id"  # trial: the artifact id of the trial's saved model
BASELINES_ATTR = "cycle_optuna_baselines"  # study: {"majority": {"label", "val_accuracy", "test_accuracy"}, ...}
# study, written by `refit`: {"trials": [numbers, best first], "artifacts": [ids], "series": n, "epochs": n}
REFIT_ATTR = "refit_model"
# study: the samplers and pruners a study ran, one entry per change ([{"from_cycle", "sampler", "pruner"}]);
# absent while the study runs with those it was created with
SEARCH_ATTR = "search_settings"
# study, written first by a running refit: {"artifacts": [ids it will write], "worker": "host:pid", "started": when};
# None once done
REFIT_PENDING_ATTR = "refit_pending"
