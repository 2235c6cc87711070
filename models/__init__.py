"""Persistence: SQLAlchemy tables, sessions and one repository module per table group.

Nothing here imports the API, the worker or the science package; below models there is only core/
(`db.database()` reads GS_DATABASE_URL from core.settings).
"""
