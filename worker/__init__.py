"""Celery app, task bodies and the job runner that calls the science package."""
