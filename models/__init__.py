"""Persistence: SQLAlchemy tables, sessions and one repository module per table group.

Nothing here imports the API, the worker or the science package: callers pass the database URL.
"""
