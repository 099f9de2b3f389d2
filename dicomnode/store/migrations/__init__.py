"""Alembic migrations of the dicomnode database (a package so they ship in the wheel)."""
