"""Prototype networks: ProtoPNet, probabilistic prototypes (Prob-PSENN), a prototype head over a
frozen backbone (ProtoFM-style). Shared pieces in parts.py, push (projection) in push.py."""

from .prob_protopnet import ProbProtoPNet
from .proto_head import ProtoHead
from .protopnet import ProtoPNet
from .push import PushResult, push_prototypes

__all__ = ["ProtoPNet", "ProbProtoPNet", "ProtoHead", "PushResult", "push_prototypes"]
