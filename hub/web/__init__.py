"""The read-only fleet dashboard (`hub serve --web ADDR`): Starlette + Jinja2 pages over
the hub's tables and ledger, served by uvicorn in the hub's event loop. See
docs/ARCHITECTURE.md "The dashboard"."""
