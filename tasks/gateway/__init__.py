"""The HTTP gateway (`ttspool serve`): OpenAI's speech API and a job API on the pool.

Torch-free and asyncio: it enqueues on the same Celery queues as every producer, waits
for results on Redis pub/sub without a thread per request, and reads the audio from
storage, which the CLI (the composition root) hands it.
"""
