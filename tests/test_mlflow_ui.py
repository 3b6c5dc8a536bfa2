"""Where users compare sweeps: the MLflow UI. Every experiment weit makes is a training-runs experiment with a
description."""

from __future__ import annotations

import pytest

from pipelines.common import EXPERIMENT_KIND_TAG, EXPERIMENT_NOTES, NOTE_TAG, TRAINING_RUNS, prepare_mlflow


def _client(uri: str):
    import mlflow

    return mlflow.MlflowClient(uri)


@pytest.mark.parametrize("experiment", ["weit-sweep", "weit-distill", "weit-ancestry", "my-own"])
def test_every_experiment_weit_makes_opens_as_training_runs_with_a_description(mlflow_uri, experiment):
    uri, exp_id = prepare_mlflow(mlflow_uri, experiment)
    tags = _client(uri).get_experiment(exp_id).tags
    assert tags[EXPERIMENT_KIND_TAG] == TRAINING_RUNS == "custom_model_development"
    assert tags[NOTE_TAG] == EXPERIMENT_NOTES.get(experiment, tags[NOTE_TAG])
    assert ("my-own" in tags[NOTE_TAG]) if experiment == "my-own" else tags[NOTE_TAG].startswith("**weit")


def test_an_existing_experiment_gets_the_tags_it_lacks_and_keeps_a_users_description(mlflow_uri):
    from pipelines.common import tracking_uri

    client = _client(tracking_uri(mlflow_uri))
    bare = client.create_experiment("weit-sweep")  # as weit before this change (or a user) made it
    noted = client.create_experiment("weit-distill", tags={NOTE_TAG: "my notes"})
    for name, exp_id in (("weit-sweep", bare), ("weit-distill", noted)):
        assert prepare_mlflow(mlflow_uri, name)[1] == exp_id
    assert client.get_experiment(bare).tags == {EXPERIMENT_KIND_TAG: TRAINING_RUNS,
                                                NOTE_TAG: EXPERIMENT_NOTES["weit-sweep"]}
    assert client.get_experiment(noted).tags == {EXPERIMENT_KIND_TAG: TRAINING_RUNS, NOTE_TAG: "my notes"}
