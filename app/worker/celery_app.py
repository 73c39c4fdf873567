"""The workers' Celery application: the service's configuration (app.services.jobs.broker)
built from the environment's Settings, with the tasks generated from the job registry
(app/worker/tasks.py). `celery -A app.worker.celery_app worker` and `lookalike worker` use it.
"""

from __future__ import annotations

from app.core.config import get_settings
from app.services.jobs.broker import make_celery

celery_app = make_celery(get_settings(), include=["app.worker.tasks"])
