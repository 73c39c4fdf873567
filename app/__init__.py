"""lookalike's service. Importing it sets the thread environment before anything loads torch or
faiss (`training.threads`), for `lookalike`, uvicorn and Celery alike."""

import training  # noqa: F401  (sets OpenMP's and BLAS's environment on import)
