"""GMIC's three predictions: the name a config or command line gives each, and the model's output key.

A leaf module (nothing to import) so that the command lines can list the choices before they
import the library.
"""

HEADS = {"global": "y_global", "local": "y_local", "fusion": "y_fusion"}
HEAD_OUTPUTS = tuple(HEADS.values())  # ('y_global', 'y_local', 'y_fusion'): the loss sums them in this order
PREDICTIONS = (*sorted(HEADS), "average")  # eval.prediction / --prediction: one head, or the mean of the three
