"""Segmentation networks behind one registry: ``create_model(name, in_channels, num_classes, **kw)``.

Importing this package imports every family module so their
``@register_model`` decorators run.
"""

from mnseg.models import (  # noqa: F401  (registration)
    discriminator,
    domain_classifier,
    effunet,
    pretext_head,
    segformer,
    swinunetr,
    unet2d,
    unet3d,
)
from mnseg.models.finetune import apply_finetuning, count_parameters
from mnseg.models.registry import create_model, list_models, model_kwargs, register_model
from mnseg.models.slicewise import SliceWise

__all__ = [
    "SliceWise",
    "apply_finetuning",
    "count_parameters",
    "create_model",
    "list_models",
    "model_kwargs",
    "register_model",
]
