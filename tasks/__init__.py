"""The queue contract, torch-free: settings, the Celery app, the job schema, the producer API."""

from .producer import Client, JobStatus
from .schema import JobSpec, JobValidationError, parse_job
from .settings import QUEUES, TASK_NAME, Settings

__all__ = ["Client", "JobSpec", "JobStatus", "JobValidationError", "QUEUES", "Settings", "TASK_NAME", "parse_job"]
