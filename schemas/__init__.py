"""Pydantic models at the HTTP edge: request `*Body`, response `*Out`, `Problem`. Leaf package."""
