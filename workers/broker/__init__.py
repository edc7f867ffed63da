"""The worker's Celery and kombu plumbing: the transport, the consumer, the batch task and
its window of held messages."""
