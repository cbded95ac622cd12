"""rlhf-workflow: reward modeling and online iterative DPO (Dong, Xiong et al., 2024)."""

__version__ = "0.1.0"


def cache_dir():
    """Where the package keeps what it prepares once and reuses: GGUF models converted to Hugging Face
    directories, the Punkt data IFEval's checkers read. ``$RLHF_WORKFLOW_CACHE``, by default
    ``~/.cache/rlhf_workflow``."""
    import os
    from pathlib import Path

    return Path(os.environ.get("RLHF_WORKFLOW_CACHE", Path.home() / ".cache" / "rlhf_workflow"))
