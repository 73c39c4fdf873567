"""lookalike's training library. Importing it sets the thread environment first
(`training.threads`): OpenMP and BLAS read it once, when torch or faiss loads."""

from training.threads import configure_environment

configure_environment()
