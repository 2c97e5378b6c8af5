"""The wire protocol of pscluster: message kinds, codec, validation, plan.

Nothing in this package touches a socket or a thread (tests/test_layout.py checks):
bytes in, messages out; messages in, frames out. Both `ps/` (servers,
scheduler) and `worker/` import it; it imports neither.
"""
from protocol.codec import decode, encode
from protocol.errors import ErrorCode, ProtocolError
from protocol.version import PROTOCOL_VERSION

__all__ = ["decode", "encode", "ErrorCode", "ProtocolError", "PROTOCOL_VERSION"]
