"""The only package that imports asyncpg. SQL lives here as constants; records leave as dataclasses."""
