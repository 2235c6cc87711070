"""HTTP surface: routes, request/response schemas, auth and settings."""
