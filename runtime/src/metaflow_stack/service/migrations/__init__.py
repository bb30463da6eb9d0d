"""Alembic revisions for the metadata service's schema (``database.migrate`` runs them)."""
