"""Sweep jobs end to end, on the embedded default and on PostgreSQL + Redis: one job trains every setting x seed,
registers each network, chooses by the named rule and audits the chosen setting."""
from __future__ import annotations

SWEEP = {"preset": "paper_cmnist_sd", "steps": 20, "eval_every": 10, "seeds": [0, 1],
         "dataset": {"name": "colored_mnist", "params": {"n_train": 600}},
         "method": {"warmup_steps": 5, "post_warmup_loss_scale": 1.0},
         "grid": {"method.sd_lambda": [0.0, 2.0], "method.sd_gamma": [0.0, [1.0, 0.5]]}}


def test_a_sweep_trains_every_setting_chooses_one_and_audits_it(stack):
    response = stack.client.post("/v1/jobs", json={"kind": "sweep", "spec": SWEEP})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["kind"] == "sweep" and job["spec"]["holdout"] == 0.2
    assert job["spec"]["selection"] == "train_domain_validation"
    done = stack.wait_for(job["id"], ("succeeded", "failed"), timeout_s=300)
    assert done["status"] == "succeeded", done["error"]
    result = done["result"]
    assert [s["params"] for s in result["settings"]] == [
        {"method.sd_lambda": 0.0, "method.sd_gamma": 0.0}, {"method.sd_lambda": 0.0, "method.sd_gamma": [1.0, 0.5]},
        {"method.sd_lambda": 2.0, "method.sd_gamma": 0.0}, {"method.sd_lambda": 2.0, "method.sd_gamma": [1.0, 0.5]}]
    assert result["scored_on"] == "validation" and result["leaks_test"] is False
    scores = [s["validation"]["worst_group_accuracy"]["mean"] for s in result["settings"]]
    assert result["chosen"] == scores.index(max(scores))
    assert [run["used"] for run in result["execution"]] == ["batched", "batched"]  # one stack per seed
    ids = [c["torchscript"] for s in result["settings"] for c in s["checkpoints"]]
    assert len(set(ids)) == 8
    for checkpoint_id in ids:  # registered, with their job (the stack is shared: not all on one list page)
        checkpoint = stack.client.get(f"/v1/checkpoints/{checkpoint_id}").json()
        assert checkpoint["job_id"] == job["id"] and checkpoint["format"] == "torchscript"

    audited = result["audit"]["reports"]
    chosen = result["settings"][result["chosen"]]["checkpoints"]
    assert [r["seed"] for r in audited] == [c["seed"] for c in chosen] == [0, 1]
    report = stack.client.get(f"/v1/jobs/{job['id']}/report")
    assert report.status_code == 200 and report.json()["pooled_summary"]["basis"] == "counterfactual"

    metrics = stack.client.get(f"/v1/jobs/{job['id']}/metrics", params={"name": "accuracy", "limit": 1000}).json()
    splits = {m["split"] for m in metrics["items"]}
    assert {f"s{i}/test" for i in range(4)} | {f"s{i}/holdout" for i in range(4)} <= splits
    lines = [line["message"] for line in stack.client.get(f"/v1/jobs/{job['id']}/logs").json()["items"]]
    assert any(line.startswith(f"chose setting {result['chosen']} ") for line in lines)


def test_bad_grids_are_refused_naming_the_field(stack):
    def refused(spec: dict) -> dict:
        response = stack.client.post("/v1/jobs", json={"kind": "sweep", "spec": spec})
        assert response.status_code == 422, response.text
        return response.json()["error"]

    assert refused({**SWEEP, "grid": {"method.sd_lamda": [1.0]}})["details"] == {"field": "spec.grid.method.sd_lamda"}
    assert refused({**SWEEP, "grid": {"optimizer.lr": [-1.0]}})["details"] == {"field": "spec.grid"}
    assert refused({**SWEEP, "grid": {"method.sd_lambda": [float(i) for i in range(16)],
                                      "method.sd_gamma": [0.0, 1.0, 2.0]}})["details"] == {"field": "spec.grid"}
    assert "limit is 64" in refused({**SWEEP, "seeds": list(range(10)),
                                     "grid": {"method.sd_lambda": [float(i) for i in range(8)]}})["message"]
    assert refused({**SWEEP, "grid": {}})["code"] in ("invalid_request", "invalid_spec")
    assert refused({**SWEEP, "selection": "peek"})["code"] == "invalid_request"
    assert refused({**SWEEP, "holdout": 0})["details"] == {"field": "spec.holdout"}


def test_a_sweep_over_the_networks_width_runs_every_setting_and_marks_the_chosen_one(embedded_stack):
    spec = {"preset": "paper_moons_sd", "steps": 30, "eval_every": 15, "seeds": [0],
            "grid": {"model.hidden": [[16], [64]]}}
    response = embedded_stack.client.post("/v1/jobs", json={"kind": "sweep", "spec": spec})
    assert response.status_code == 202, response.text
    done = embedded_stack.wait_for(response.json()["id"], ("succeeded", "failed"), timeout_s=300)
    assert done["status"] == "succeeded", done["error"]
    result = done["result"]
    assert [s["params"] for s in result["settings"]] == [{"model.hidden": [16]}, {"model.hidden": [64]}]
    assert [run["settings"] for run in result["execution"]] == [[0], [1]]  # one shape a stack, in turn
    scores = [s["validation"]["accuracy"]["mean"] for s in result["settings"]]
    assert result["chosen"] == scores.index(max(scores))
    checkpoint = embedded_stack.client.get(f"/v1/checkpoints/{result['settings'][1]['checkpoints'][0]['torchscript']}")
    assert checkpoint.json()["model_info"]["arch_params"]["hidden"] == [64]
