"""Use cases, one module per aggregate. Never imports aiohttp, asyncpg or schemas."""
