"""zoo — a reference zoo of self-interpretable neural networks.

    import zoo
    zoo.list_models()
    model = zoo.create_model("cnn", num_classes=4)
    model = zoo.load("cnn-synthetic")          # a pretrained folder under checkpoints/
    explanation = model.explain(images)         # zoo.Explanation
"""

from zoo.explanation import Explanation
from zoo.hub import list_pretrained, load, save
from zoo.registry import create_model, list_models, register_model

__all__ = ["Explanation", "create_model", "list_models", "register_model", "save", "load", "list_pretrained"]
__version__ = "0.1.0"
