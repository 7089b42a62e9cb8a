"""The OpenAI-compatible HTTP frontend: tokenizes, routes to a worker over NATS, streams back.

It imports only the shared `contract` package, never a worker or an engine. The app factory
is `frontend.app.create_app`; `python -m frontend` runs it under uvicorn.
"""
