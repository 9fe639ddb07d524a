"""jquant's bundled reference models (``jq-llama-tiny``, ``jq-llama-small``, ...), shipped apart from the library.

Each folder here is one model (a Hugging Face folder or a ``jquant.checkpoint`` folder, with its tokenizer and
``reference_info.json``); ``jquant.models.load("jq-llama-tiny")`` finds them through this package.
"""

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent
