from expertrag.retrieval.builder import BuildReport, build_index
from expertrag.retrieval.config import RetrievalConfig
from expertrag.retrieval.index import Index
from expertrag.retrieval.types import MODES, Filters, Hit

__all__ = ["MODES", "BuildReport", "Filters", "Hit", "Index", "RetrievalConfig", "build_index"]
