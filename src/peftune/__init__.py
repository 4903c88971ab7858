"""peftune: parameter-efficient fine-tuning for abstractive summarization.

>>> from peftune import Config, config_from_dict
>>> cfg = config_from_dict({"method": "lora", "lora": {"r": 16}, "train": {"epochs": 1}})
>>> cfg.method_options.r
16
"""

from peftune.config import Config, config_from_dict, load_yaml
from peftune.errors import PeftuneError

__all__ = ["Config", "PeftuneError", "config_from_dict", "load_yaml"]
__version__ = "0.1.0"
