"""The batch pipeline: from the messages a worker holds to stored audio and recorded
results (admission, held work, the runner, the store stage), without Celery's plumbing."""
