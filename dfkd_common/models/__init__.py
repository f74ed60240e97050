"""Model zoo and generators, registered by name."""

from dfkd_common.models import coupled as _coupled  # noqa: F401  (registers the 'coupled' generator)
from dfkd_common.models.generators import GENERATORS, build_generator
from dfkd_common.models.zoo import MODELS, Classifier, build_model

__all__ = ["GENERATORS", "MODELS", "Classifier", "build_generator", "build_model"]
