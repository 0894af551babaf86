"""Thin HTTP handlers, one module per resource; middleware, problem mapping and the route table."""
