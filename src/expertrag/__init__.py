"""ExpertRAG: adaptive retrieval-augmented generation with a Mixture-of-Experts language model."""

__version__ = "0.1.0"
