"""SilentCipher watermark inference in plain PyTorch, faithful to Sony's silentcipher 1.0.5.

:class:`SilentCipher` loads the published 44.1 kHz checkpoint directory and embeds or decodes the
5-byte message; see model.py for what is kept from the package and why.
"""

from misotts_agents.model.silentcipher.checkpoint import (
    CHECKPOINT_FILES,
    HPARAMS_FILE,
    SilentCipherConfig,
    config_from_hparams,
)
from misotts_agents.model.silentcipher.message import DecodedMessage
from misotts_agents.model.silentcipher.model import REFERENCE_POWER, SilentCipher, build_networks

__all__ = [
    "CHECKPOINT_FILES",
    "HPARAMS_FILE",
    "REFERENCE_POWER",
    "DecodedMessage",
    "SilentCipher",
    "SilentCipherConfig",
    "build_networks",
    "config_from_hparams",
]
