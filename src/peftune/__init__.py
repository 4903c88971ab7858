"""peftune: parameter-efficient fine-tuning for abstractive summarization.

>>> from peftune import Config, config_from_dict
>>> cfg = config_from_dict({"method": "lora", "lora": {"r": 16}, "train": {"epochs": 1}})
>>> cfg.method_options.r
16
"""

import logging
import sys

if sys.version_info < (3, 11):  # transformers 5.24 and aclsum need 3.11 (so does search)
    raise ImportError("peftune needs Python 3.11 or newer; this is Python "
                      f"{sys.version_info[0]}.{sys.version_info[1]} ({sys.executable})")

# bitsandbytes (imported by peft) warns on import that an optional CPU kernel, fetched from
# the hub by the `kernels` package, is missing; its own CPU kernels work without it.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "kernels-community" not in record.getMessage())

from peftune.config import Config, config_from_dict, load_yaml  # noqa: E402
from peftune.errors import PeftuneError  # noqa: E402

__all__ = ["Config", "PeftuneError", "config_from_dict", "load_yaml"]
__version__ = "0.1.0"
