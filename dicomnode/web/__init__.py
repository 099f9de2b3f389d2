"""HTTP side of the node (FastAPI): health, metrics, STOW-RS, admin pages and REST API."""
