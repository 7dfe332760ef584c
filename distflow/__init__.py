"""distflow: a decentralized multi-controller runtime for RL post-training of LLMs."""
from distflow.dag import DAGError, Pipeline, Stage
from distflow.runtime.batch import Batch
from distflow.runtime.context import StageContext

__all__ = ["Batch", "DAGError", "Pipeline", "Stage", "StageContext"]
