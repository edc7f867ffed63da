"""The GPU side: ChatTTS engine, the Celery batch task, the worker process."""
