"""The metadata service: Metaflow's REST API, paginated, filterable, with events.

``app.create_app`` serves every route Metaflow's ``ServiceMetadataProvider``
calls, with the shapes and version header of service 2.5.x, plus opt-in
pagination, filters, run summaries and an event stream. ``store`` holds the
SQL (SQLite or PostgreSQL, one schema migrated by alembic); ``outbox`` turns
committed writes into ordered events for ``metaflow_stack.events``.
"""
