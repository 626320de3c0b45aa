"""Alembic migrations for the quartchat schema (installed as ``quartchat.migrations``)."""
