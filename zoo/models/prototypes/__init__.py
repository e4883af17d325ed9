"""Prototype networks: ProtoPNet, probabilistic prototypes (Prob-PSENN), a prototype head over a
frozen backbone (ProtoFM-style). One file a job:

* ``similarity.py``  the ProtoPNet distance (log-L2 / cosine) and similarity
* ``losses.py``      cluster / separation / L1 costs
* ``attribution.py`` the exact and the similarity attribution maps
* ``network.py``     ``PrototypeNetwork``: the shared Lightning base (head, explanation, schedule)
* ``push.py``        push (projection onto training patches) with provenance
* ``report.py``      the family's table rows (EvalProtoPNet, calibration, OOD)
* ``protopnet.py``, ``prob_protopnet.py``, ``proto_head.py``: the registered models
"""

from .attribution import prototype_attribution, spread_over_cells, spread_within_cells
from .losses import cluster_separation, l1_wrong_class
from .network import PrototypeNetwork
from .prob_protopnet import ProbProtoPNet
from .proto_head import ProtoHead
from .protopnet import ProtoPNet
from .push import PushResult, push_prototypes
from .similarity import LOG_EPS, cosine_distances, distances, l2_distances, similarity_from_distance

__all__ = ["LOG_EPS", "ProtoPNet", "ProbProtoPNet", "ProtoHead", "PrototypeNetwork", "PushResult", "cluster_separation",
           "cosine_distances", "distances", "l1_wrong_class", "l2_distances", "prototype_attribution", "push_prototypes",
           "similarity_from_distance", "spread_over_cells", "spread_within_cells"]
