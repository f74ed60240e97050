"""Networks: the zoo, model sources (a reference -> a network), generators and feature hooks.

Registered components are imported when named (:data:`dfkd_common.index.INDEX`).
"""

from dfkd_common.models.generators import GENERATORS, build_generator
from dfkd_common.models.hooks import describe_network
from dfkd_common.models.sources import SOURCES, build_fitting, build_for, build_model, resolve
from dfkd_common.models.zoo import MODELS, Classifier

__all__ = ["GENERATORS", "MODELS", "SOURCES", "Classifier", "build_fitting", "build_for", "build_generator",
           "build_model", "describe_network", "resolve"]
