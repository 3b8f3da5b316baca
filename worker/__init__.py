"""vLLM-backed inference worker for embeddings and scoring."""

__version__ = "0.1.0"
