"""Jobs: validated and recorded by the API, queued on Celery, run by the workers (docs/jobs.md).

    base.py        queues, JobParams, JobKind, the job's folder, shared checks
    registry.py    the job kinds: the only list of them
    train.py, evaluate.py, index.py, imports.py, dataset.py
                   one kind each: its parameters, checks before queuing, and body
    submission.py  validate, record and queue (POST /jobs)
    lifecycle.py   the row's state machine: claim, heartbeat and progress, finish, cancel,
                   lost workers; `execute` runs a body inside a worker
    broker.py      the Celery configuration and the API's publisher

app/worker/ is the Celery glue only: one task per registry entry, and the worker signals.
"""
