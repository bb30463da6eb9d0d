"""The metadata service: Metaflow's REST API, paginated, filterable, with events.

``app.create_app`` serves every route Metaflow's ``ServiceMetadataProvider``
calls, with the shapes and version header of service 2.5.x, plus opt-in
pagination, filters, run summaries and an event stream. ``store`` holds the
SQL (SQLite or PostgreSQL, one schema migrated by alembic); every write appends
its events to the log in its own transaction (``event_log``), which ``events``
publishes in order.
"""
