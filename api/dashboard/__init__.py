"""The web dashboard: server-rendered pages under /dashboard, live curves over SSE, no build step."""
from api.dashboard.routes import router

__all__ = ["router"]
