"""X-Node (and the plain-GNN control ``gnn``): node classifiers over kNN image graphs whose nodes
explain themselves.

``model.py`` the registered models and their method; ``text.py`` the offline text and its checker;
``report.py`` the family's table rows. The graph input wrapper lives in :mod:`zoo.graph_input`.
"""

from zoo.graph_input import GraphInput

from .model import BACKBONES, GNN, XNode
from .report import graph_rows
from .text import check_text, describe

__all__ = ["BACKBONES", "GNN", "GraphInput", "XNode", "check_text", "describe", "graph_rows"]
