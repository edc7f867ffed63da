"""The GPU side: the engine, the batch pipeline, its Celery plumbing, the worker process."""
