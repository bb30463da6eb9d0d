"""The metadata service: Metaflow's REST API, paginated, filterable, with events.

``app.create_app`` serves every route Metaflow's ``ServiceMetadataProvider``
calls, with the shapes and version header of service 2.5.x, plus opt-in
pagination, filters, run summaries and an event stream. ``store`` holds the
SQL (SQLite or PostgreSQL, one schema migrated by alembic); every write puts
its events in the log in its own transaction (``event_log``: a metadata row is
its own event, other writes append an event row), which ``events`` publishes
in order.
"""
