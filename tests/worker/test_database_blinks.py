"""A running job rides out a database that blinks: its progress and cancel checks do not fail the attempt."""
from __future__ import annotations

from core.settings import get_settings
from models.db import Database
from tests.conftest import free_port
from worker.context import JobContext, JobWriter


def test_progress_and_cancel_checks_carry_on_while_the_database_is_unreachable(caplog):
    unreachable = Database(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/gs")
    settings = get_settings().model_copy(update={"cancel_poll_s": 0.0})
    ctx = JobContext(db=unreachable, job_id="job1", owner_id="owner", settings=settings,
                     writer=JobWriter(unreachable, "job1"))
    ctx.on_progress(0.5)
    assert ctx.should_stop() is False
    assert "progress not stored" in caplog.text and "cancel flag not read" in caplog.text
