"""A sequential run stopped midway and run again with the same resume folder goes on from its last saved step, and
ends with exactly the networks and numbers of a run that was never stopped."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from starvation.training import Resume, TrainingStopped, train

SPEC = {"preset": "paper_cmnist_sd", "dataset": {"name": "colored_mnist", "params": {"n_train": 400}}, "steps": 60,
        "eval_every": 10, "batch_size": 64, "seeds": [0, 1], "execution": "sequential", "save_every": 15}


def stop_after(calls: int):
    count = {"n": 0}

    def should_stop() -> bool:
        count["n"] += 1
        return count["n"] > calls

    return should_stop


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return train(SPEC, out_dir=tmp_path_factory.mktemp("full"))


def test_a_stopped_run_resumes_from_its_last_save_and_ends_as_if_never_stopped(uninterrupted, tmp_path) -> None:
    folder = tmp_path / "resume"
    with pytest.raises(TrainingStopped, match="step 20 of seed 1"):
        train(SPEC, out_dir=tmp_path / "first", resume_dir=folder, should_stop=stop_after(80))
    assert Resume.reported(folder) == {0: None, 1: 15}  # seed 0 finished; seed 1 saved at step 15

    reported = []
    again = train(SPEC, out_dir=tmp_path / "again", resume_dir=folder, on_metrics=reported.extend)
    assert again.result["resumed"] == {"1": 15}
    assert sorted({(m.seed, m.step) for m in reported}) == [(1, step) for step in (20, 30, 40, 50, 60)]
    assert again.result["splits"] == uninterrupted.result["splits"]
    assert again.result["starved_fraction"] == uninterrupted.result["starved_fraction"]
    for resumed, whole in zip(again.checkpoints, uninterrupted.checkpoints):
        a, b = load_file(resumed.safetensors_path), load_file(whole.safetensors_path)
        assert all(torch.equal(a[k], b[k]) for k in b)


def test_without_save_every_nothing_is_saved(tmp_path) -> None:
    spec = {**SPEC, "save_every": None, "seeds": [0], "steps": 10}
    train(spec, out_dir=tmp_path / "run", resume_dir=tmp_path / "resume")
    assert not (tmp_path / "resume").exists() or not any((tmp_path / "resume").iterdir())


def test_a_saved_state_loads_without_unpickling_anything_but_tensors(tmp_path) -> None:
    spec = {**SPEC, "seeds": [0], "steps": 15}
    train(spec, out_dir=tmp_path / "run", resume_dir=tmp_path / "resume")
    state = torch.load(tmp_path / "resume" / "seed0.pt", weights_only=True)
    assert state["finished"] and state["step"] == 15 and set(state["model"]) == set(
        load_file(next((tmp_path / "run").glob("*.safetensors"))))
