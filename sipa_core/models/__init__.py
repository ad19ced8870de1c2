"""Network builders, the registry of named architectures, networks from other sources
(``sources``: torchvision, timm, the user's module) and where any network splits for an
early exit (``split``)."""

from sipa_core.models.blocks import BlockArgs, decode_block, decode_blocks, round_filters, round_repeats
from sipa_core.models.efficientnet import BlockInfo, EfficientNet, MBConv, efficientnet_spec
from sipa_core.models.registry import ARCHITECTURES, create_model, create_spec, list_architectures, create_family_spec
from sipa_core.models import sources, split
from sipa_core.models.wrn import WideResNet, wrn_spec

__all__ = [
    "ARCHITECTURES", "BlockArgs", "BlockInfo", "EfficientNet", "MBConv", "WideResNet", "create_model",
    "decode_block", "decode_blocks", "efficientnet_spec", "create_spec", "list_architectures", "create_family_spec",
    "round_filters", "round_repeats", "sources", "split", "wrn_spec",
]
