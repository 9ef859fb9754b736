"""The pipeline's cluster branch plans the run before its job exists (habla.kubeflow.cluster_step): the same plan
``habla train --dry-run`` prints, a refusal before any GPU is requested, and pods sized from the plan's node."""

from __future__ import annotations

import pytest
from fixtures.releases import MINI

from habla.core.errors import HablaError
from habla.kubeflow.cluster_step import TrainPods, plan_training
from habla.runs.parameters import RunParameters
from habla.training.command import TrainStep, plan_metrics
from habla.training.train import plan_run


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    from habla.data.options import PrepareOptions
    from habla.data.prepare import prepare

    out = tmp_path_factory.mktemp("prepared")
    prepare(str(MINI), str(out), PrepareOptions(shards=1), workers=2)
    return str(out)


def test_the_plan_step_is_habla_trains_plan_and_the_pods_take_its_node(dataset, capsys):
    step = TrainStep("", dataset, "fastconformer_ctc_bpe", "model.train_ds.num_workers=4", max_epochs=3)
    plan = plan_training(step, 2, "8")
    inputs = step.inputs
    assert plan == plan_run(inputs.config, inputs.train_manifest, inputs.overrides, inputs.train_tars, 2, 8)
    logged = capsys.readouterr().out
    assert all(f"plan: {line}" in logged for line in plan["described"])
    assert plan["world"]["world_size"] == 16 and plan["schedule"]["budget_from"] == "max_epochs"
    assert plan_metrics(plan)["schedule.max_steps"] == plan["schedule"]["max_steps"]

    node = plan["node"]
    assert TrainPods("auto", "auto", {}, ()).planned(plan) == TrainPods(str(node["cpu"]), node["memory"], {}, ())
    assert TrainPods("8", "auto", {}, ()).planned(plan) == TrainPods("8", node["memory"], {}, ())
    assert TrainPods("8", "64Gi", {}, ()).planned(None) == TrainPods("8", "64Gi", {}, ())
    with pytest.raises(HablaError, match="train_memory=auto needs the run's plan"):
        TrainPods("8", "auto", {}, ()).planned(None)


def test_a_world_the_global_batch_cannot_hold_fails_the_plan_step(dataset):
    with pytest.raises(HablaError, match="4096 devices cannot train on global_batch 2048"):
        plan_training(TrainStep("", dataset, "fastconformer_ctc_bpe"), 512, "8")


@pytest.mark.parametrize("name", ["train_cpu", "train_memory"])
def test_auto_requests_are_for_cluster_jobs_only(name):
    sized = {"train_cpu": "8", "train_memory": "64Gi"}
    RunParameters.checked({**sized, name: "auto", "launcher": "trainjob"}, release_uri="r", output_uri="o")
    RunParameters.checked({**sized, "launcher": "local"}, release_uri="r", output_uri="o")
    with pytest.raises(HablaError) as err:
        RunParameters.checked({**sized, name: "auto", "launcher": "local"}, release_uri="r", output_uri="o")
    assert str(err.value).startswith(f"pipeline parameter {name}='auto'") and "for cluster jobs" in str(err.value)
