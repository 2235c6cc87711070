"""A diverged loss (NaN, inf) reaches neither database as a metric: the rest of its evaluation is stored, the job's
log says where the training diverged, and the metrics page stays valid JSON."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from core.settings import get_settings
from models import job_logs as logs_repo
from models import jobs as jobs_repo
from models import metrics as metrics_repo
from models.db import Database
from models.migrate import upgrade
from tests.conftest import POSTGRES_URL, scratch_postgres
from worker.context import JobContext, JobWriter


@pytest.fixture(params=["postgres", "sqlite"])
def db(request, tmp_path):
    if request.param == "postgres":
        url = scratch_postgres(POSTGRES_URL.rsplit("/", 1)[-1] + "_non_finite")
    else:
        url = f"sqlite:///{tmp_path / 'gs.db'}"
    upgrade(url)
    database = Database(url)
    yield database
    database.engine.dispose()


def test_a_diverged_loss_is_logged_once_and_the_rest_is_stored(db):
    with db.session() as session:
        job_id = jobs_repo.create(session, owner_id="tenant", kind="train", spec={}, tags={}, queue="cpu",
                                  callback_url=None).id
    writer = JobWriter(db, job_id)
    writer.start()
    ctx = JobContext(db=db, job_id=job_id, owner_id="tenant", settings=get_settings(), writer=writer)

    def row(step: int, name: str, value: float) -> SimpleNamespace:
        return SimpleNamespace(step=step, name=name, value=value, seed=0, split="train")

    ctx.on_metrics([row(10, "loss", 0.7), row(10, "accuracy", 0.5)], log_lines=False)
    stored = ctx.on_metrics([row(20, "loss", float("nan")), row(20, "accuracy", 0.5)], log_lines=False)
    ctx.on_metrics([row(30, "loss", float("inf")), row(30, "accuracy", 0.5)], log_lines=False)
    writer.close()
    assert stored == [{"step": 20, "name": "accuracy", "value": 0.5, "seed": 0, "split": "train"}]
    with db.session() as session:
        kept = [(m.step, m.name) for m in metrics_repo.query(session, job_id)]
        lines = [line.message for line in logs_repo.query(session, job_id)]
    assert kept == [(10, "loss"), (10, "accuracy"), (20, "accuracy"), (30, "accuracy")]
    assert lines == ["loss is nan at step 20 (split train seed 0): the training diverged (a smaller learning rate "
                     "may help); values that are not finite are not stored"]
