"""jaxcl: global and local contrastive pre-training for label-efficient medical image segmentation."""

__version__ = "0.1.0"
