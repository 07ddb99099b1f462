"""Reference ASGI apps served by uvicorn exactly as kvservice is, to bound what it can reach."""
