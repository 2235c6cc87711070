"""A sweep's job page on the real service (API + worker, embedded default), read as the signed-in browser reads it:
plain HTML over HTTP with the session cookie (the page has no script of its own for sweeps, so no browser needed)."""
from __future__ import annotations

from html.parser import HTMLParser

import httpx
import pytest

from api.dashboard.views import fmt
from tests.conftest import ADMIN_TOKEN
from tests.e2e.test_sweep_flow import SWEEP



class Tables(HTMLParser):
    """Every table with an id: its rows, each {"attrs", "cells": [{"tag", "attrs", "text"}]}."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tables: dict[str, list[dict]] = {}
        self.current: list[dict] | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        if tag == "table" and "id" in attributes:
            self.current = self.tables[attributes["id"]] = []
        elif self.current is not None and tag == "tr":
            self.current.append({"attrs": attributes, "cells": []})
        elif self.current is not None and tag in ("td", "th"):
            self.current[-1]["cells"].append({"tag": tag, "attrs": attributes, "text": ""})

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self.current = None

    def handle_data(self, data: str) -> None:
        if self.current and self.current[-1]["cells"]:
            self.current[-1]["cells"][-1]["text"] += data


def text(cell: dict) -> str:
    return " ".join(cell["text"].split())


@pytest.fixture(scope="module")
def sweeps(embedded_stack) -> dict[str, dict]:
    """Two finished sweeps of one grid, by selection rule: the honest one audited, the oracle not (to save time)."""
    specs = {"train_domain_validation": SWEEP, "oracle": {**SWEEP, "selection": "oracle", "audit": False}}
    ids = {rule: embedded_stack.client.post("/v1/jobs", json={"kind": "sweep", "spec": spec}).json()["id"]
           for rule, spec in specs.items()}
    jobs = {rule: embedded_stack.wait_for(job_id, ("succeeded", "failed"), timeout_s=300)
            for rule, job_id in ids.items()}
    assert {rule: job["status"] for rule, job in jobs.items()} == dict.fromkeys(specs, "succeeded"), jobs
    return jobs


@pytest.fixture(scope="module")
def dashboard(embedded_stack):
    """A client signed in through the login form: it holds the session cookie a browser would."""
    with httpx.Client(base_url=str(embedded_stack.client.base_url), timeout=30) as client:
        signed_in = client.post("/dashboard/login", data={"token": ADMIN_TOKEN, "next": "/dashboard/jobs"},
                                follow_redirects=False)
        assert signed_in.status_code == 303 and "gs_session" in client.cookies
        yield client


def page(dashboard: httpx.Client, path: str) -> str:
    response = dashboard.get(path)
    assert response.status_code == 200, response.text
    return response.text


@pytest.mark.parametrize("rule", ["train_domain_validation", "oracle"])
def test_a_sweep_page_lists_every_setting_with_the_chosen_one_marked(sweeps, dashboard, rule):
    job = sweeps[rule]
    result = job["result"]
    html = page(dashboard, f"/dashboard/jobs/{job['id']}")
    header, *rows = Tables(html).tables["sweep-table"]
    assert [text(cell) for cell in header["cells"]][2:6] == [
        "validation accuracy", "validation worst-group accuracy", "test accuracy", "test worst-group accuracy"]
    assert len(rows) == 4
    assert [row["attrs"]["data-index"] for row in rows if "chosen" in row["attrs"]["class"].split()] == [
        str(result["chosen"])]
    assert "chosen" in text(rows[result["chosen"]]["cells"][0])  # the badge
    for row, setting in zip(rows, result["settings"]):
        validation, test = setting["validation"] or {}, setting["test"]
        expected = [fmt(validation.get("accuracy")), fmt(validation.get("worst_group_accuracy")),
                    fmt(test["accuracy"]), fmt(test["worst_group_accuracy"])]
        assert [text(cell) for cell in row["cells"][2:6]] == expected
        assert "±" in expected[2]  # two seeds: mean ± std
    assert rule != "oracle" or result["settings"][0]["validation"] is None  # the oracle holds nothing out
    leak_note = "oracle: chosen on the test split — this leaks the test set"
    assert (leak_note in " ".join(html.split())) is result["leaks_test"] is (rule == "oracle")


@pytest.mark.parametrize("rule", ["train_domain_validation", "oracle"])
def test_a_lambda_by_gamma_sweep_draws_heat_maps_with_the_chosen_cell_marked(sweeps, dashboard, rule):
    job = sweeps[rule]
    chosen, metric = job["result"]["chosen"], job["result"]["metric"]
    tables = Tables(page(dashboard, f"/dashboard/jobs/{job['id']}")).tables
    parts = ["validation", "test"] if rule == "train_domain_validation" else ["test"]  # no validation to draw
    assert sorted(name for name in tables if name.startswith("heat-")) == sorted(f"heat-{p}" for p in parts)
    for part in parts:
        header, *rows = tables[f"heat-{part}"]
        assert [text(cell) for cell in header["cells"]] == ["", "γ 0.0", "γ [1.0, 0.5]"]
        assert [text(row["cells"][0]) for row in rows] == ["λ 0.0", "λ 2.0"]
        cells = [[cell for cell in row["cells"] if cell["tag"] == "td"] for row in rows]
        assert [len(row) for row in cells] == [2, 2]
        flat = [cell for row in cells for cell in row]
        assert [i for i, cell in enumerate(flat) if "chosen" in cell["attrs"]["class"].split()] == [chosen]
        assert all("background: hsl(" in cell["attrs"]["style"] for cell in flat)
        assert [text(cell) for cell in flat] == [fmt(s[part][metric]["mean"]) for s in job["result"]["settings"]]


def test_each_setting_checkpoint_downloads_from_its_row(sweeps, dashboard, embedded_stack):
    job = sweeps["train_domain_validation"]
    html = page(dashboard, f"/dashboard/jobs/{job['id']}")
    for setting in job["result"]["settings"]:
        assert [c["seed"] for c in setting["checkpoints"]] == [0, 1]
        for checkpoint in setting["checkpoints"]:
            assert f'href="/dashboard/checkpoints/{checkpoint["torchscript"]}/file"' in html
    link = f"/dashboard/checkpoints/{job['result']['settings'][0]['checkpoints'][0]['torchscript']}/file"
    download = dashboard.get(link)
    assert download.status_code == 200 and download.content.startswith(b"PK")  # TorchScript is a zip archive
    with httpx.Client(base_url=str(embedded_stack.client.base_url), timeout=30) as anonymous:
        assert anonymous.get(link, follow_redirects=False).status_code == 303  # to sign-in, not the file


def test_an_audited_sweep_shows_its_choice_and_the_chosen_setting_reliance(sweeps, dashboard):
    job = sweeps["train_domain_validation"]
    summary = {text(row["cells"][0]): text(row["cells"][1])
               for row in Tables(page(dashboard, f"/dashboard/jobs/{job['id']}")).tables["summary"]}
    assert summary["selection"] == "train_domain_validation"
    assert summary["scored by"] == "worst_group_accuracy on validation"
    assert summary["reliance score"] and summary["verdict"] == job["result"]["audit"]["summary"]["verdict"]
    oracle = {text(row["cells"][0]) for row in Tables(page(
        dashboard, f"/dashboard/jobs/{sweeps['oracle']['id']}")).tables["summary"]}
    assert "reliance score" not in oracle  # not audited


def test_the_jobs_list_filters_sweeps_and_describes_them(sweeps, dashboard):
    rows = {row["attrs"]["data-job-id"]: row for row in Tables(page(dashboard, "/dashboard/jobs?kind=sweep"))
            .tables["jobs-table"] if "data-job-id" in row["attrs"]}
    assert {job["id"] for job in sweeps.values()} <= set(rows)
    assert {text(row["cells"][3]) for row in rows.values()} == {"sweep"}  # the other tests' train jobs are not
    for job in sweeps.values():
        cells = [text(cell) for cell in rows[job["id"]]["cells"]]
        assert cells[3] == "sweep" and cells[5] == "paper_cmnist_sd sweep of 4 settings, 20 steps, seeds 0, 1"
        chosen = job["result"]["settings"][job["result"]["chosen"]]
        assert cells[6] == fmt(chosen["test"]["accuracy"]["mean"])  # the chosen setting's test accuracy
    assert 'value="sweep" selected' in page(dashboard, "/dashboard/jobs?kind=sweep")
