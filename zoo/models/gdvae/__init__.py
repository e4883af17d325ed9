"""GdVAE (Gaussian Discriminant VAE): counterfactual explanations in closed form.

``model.py`` the registered model and its method; ``networks.py`` encoder and decoders;
``report.py`` the counterfactual rows and the gradient-search comparison point.
"""

from .model import ATTRIBUTION_REFERENCES, CF_METHODS, DECODERS, GdVAE, pairwise_log_odds
from .networks import Decoder, Encoder, ObjectDecoder
from .report import counterfactual_report, counterfactual_rows, gradient_counterfactuals

__all__ = ["ATTRIBUTION_REFERENCES", "CF_METHODS", "DECODERS", "Decoder", "Encoder", "GdVAE", "ObjectDecoder",
           "counterfactual_report", "counterfactual_rows", "gradient_counterfactuals", "pairwise_log_odds"]
