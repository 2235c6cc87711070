"""The train spec's OpenAPI schema is the engine's: what it documents is what a job runs with, and the API accepts
every option the engine reads."""
from __future__ import annotations

import pytest
import torch

# The smallest spec with no preset: everything else comes from the defaults the document shows.
BARE = {"dataset": {"name": "two_moons"}}


def submit(client, headers, spec: dict) -> dict:
    response = client.post("/v1/jobs", json={"kind": "train", "spec": spec}, headers=headers)
    assert response.status_code == 202, response.text
    return response.json()["spec"]


def train_spec_schema(client) -> dict:
    return client.get("/openapi.json").json()["components"]["schemas"]["TrainSpec"]["properties"]


def variant(section: dict, name: str) -> dict:
    [chosen] = [v for v in section["anyOf"] if v["properties"].get("name", v["properties"].get("arch")) == {"const": name}]
    return chosen


def variant_defaults(section: dict, name: str) -> dict:
    return {key: p["default"] for key, p in variant(section, name)["properties"].items() if "default" in p}


def test_every_plain_field_documents_the_default_a_job_runs_with(client, tenant):
    fields = train_spec_schema(client)
    ran = submit(client, tenant(), BARE)
    plain = [name for name in fields if name not in ("dataset", "model", "method", "optimizer", "timeout_s", "mlflow",
                                                   "init_checkpoint_id")]  # service fields: kept only when given
    assert {"steps", "seeds", "batch_size", "eval_every", "device", "audit", "precision"} <= set(plain)
    for name in plain:  # FastAPI leaves null defaults out of the document
        assert fields[name].get("default") == ran[name], name


@pytest.mark.parametrize("section, identity", [("model", "arch"), ("method", "name"), ("optimizer", "name")])
def test_the_default_section_documents_its_parameters_defaults(client, tenant, section, identity):
    schema = train_spec_schema(client)[section]
    chosen = schema["x-default"][identity]  # an object default breaks client generators (api/schemas.py)
    ran = submit(client, tenant(), BARE)[section]
    assert ran[identity] == chosen
    assert {k: v for k, v in ran.items() if k != identity} == variant_defaults(schema, chosen)


@pytest.mark.parametrize("section, name", [("method", "sd"), ("method", "weight_decay"), ("method", "erm"),
                                           ("method", "irm"), ("method", "group_dro"), ("method", "jtt"), ("optimizer", "sgd"), ("optimizer", "adam"), ("model", "cnn")])
def test_each_choice_documents_the_defaults_it_runs_with(client, tenant, section, name):
    schema = train_spec_schema(client)[section]
    identity = "arch" if section == "model" else "name"
    ran = submit(client, tenant(), {**BARE, section: {identity: name}})[section]
    documented = variant_defaults(schema, name)
    assert {k: ran[k] for k in ran if k != identity} == documented


def test_every_parameter_of_sd_is_documented(client):
    from starvation.methods import SpectralDecoupling

    sd = variant(train_spec_schema(client)["method"], "sd")
    assert set(sd["properties"]) == {"name", *SpectralDecoupling.PARAMS}


def test_irm_and_noise_draws_are_documented_and_a_job_runs_with_them(client, tenant):
    from starvation.datasets.colored_mnist import ColoredMNIST
    from starvation.methods import IRM

    fields = train_spec_schema(client)
    assert set(variant(fields["method"], "irm")["properties"]) == {"name", *IRM.PARAMS}
    [cmnist] = [v for v in fields["dataset"]["anyOf"] if v["properties"]["name"] == {"const": "colored_mnist"}]
    draws = cmnist["properties"]["params"]["properties"]["noise_draws"]
    assert draws["default"] == 1 and draws["maximum"] == 20 and set(cmnist["properties"]["params"]["properties"]) == set(
        ColoredMNIST.PARAMS)
    ran = submit(client, tenant(), {"preset": "paper_cmnist_irm", "dataset": {"params": {"noise_draws": 3}}})
    assert ran["method"]["name"] == "irm" and ran["method"]["penalty_weight"] == 91257.18613115903
    assert ran["dataset"]["params"]["noise_draws"] == 3


def test_adam_betas_and_eps_are_accepted_and_used(client, tenant):
    from starvation.training import build_optimizer

    ran = submit(client, tenant(), {**BARE, "optimizer": {"name": "adam", "betas": [0.9, 0.99], "eps": 1e-7}})
    assert ran["optimizer"] == {"name": "adam", "lr": 1e-3, "betas": [0.9, 0.99], "eps": 1e-7}
    optimizer = build_optimizer(ran["optimizer"], [torch.nn.Parameter(torch.zeros(1))])
    assert optimizer.defaults["betas"] == (0.9, 0.99) and optimizer.defaults["eps"] == 1e-7


@pytest.mark.parametrize("spec, field", [
    ({**BARE, "optimizer": {"name": "adam", "betas": [0.9]}}, "betas"),
    ({**BARE, "method": {"name": "sd", "warmup_steps": -1}}, "warmup_steps"),
    ({**BARE, "precision": "fp8"}, "precision"),
    ({**BARE, "method": {"name": "irm", "penalty_weight": -1}}, "penalty_weight"),
    ({"dataset": {"name": "colored_mnist", "params": {"noise_draws": 21}}}, "noise_draws"),
])
def test_what_the_engine_refuses_is_an_invalid_spec_naming_it(client, tenant, spec, field):
    response = client.post("/v1/jobs", json={"kind": "train", "spec": spec}, headers=tenant())
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_spec"
    assert field in response.json()["error"]["message"]
