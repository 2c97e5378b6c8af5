"""Error codes carried by `error` replies, and the exception that names one."""
from __future__ import annotations

import enum


class ErrorCode(str, enum.Enum):
    """Why a request was refused. The value is what travels on the wire."""

    BAD_FRAME = "bad_frame"          # not a message at all: garbage, not msgpack, empty
    BAD_VERSION = "bad_version"      # protocol version we do not speak
    UNKNOWN_OP = "unknown_op"        # op not in the table
    BAD_FIELD = "bad_field"          # a header field missing or of the wrong type
    BAD_DTYPE = "bad_dtype"          # payload dtype outside the allow-list or not the plan's
    BAD_LENGTH = "bad_length"        # payload bytes != count * itemsize, or != the slice's size
    TRUNCATED = "truncated"          # fewer (or more) payload frames than the header lists
    TOO_LARGE = "too_large"          # message over max_message_bytes
    UNKNOWN_JOB = "unknown_job"      # no table / no job with that id
    UNKNOWN_SLICE = "unknown_slice"  # slice id not in the job's plan on this shard
    BAD_CLOCK = "bad_clock"          # clock out of range, behind or ahead of the table
    NOT_MEMBER = "not_member"        # worker outside the job's current membership epoch
    REASSIGNED = "reassigned"        # the worker's partitions changed: it asks the scheduler which it holds
    FORBIDDEN = "forbidden"          # the authenticated key's role may not do this (README.md, "Security")
    EXISTS = "exists"                # table already created with a different plan
    BAD_PLAN = "bad_plan"            # plan inconsistent with its own inputs
    BAD_SPEC = "bad_spec"            # a job file / job spec field is wrong
    BAD_STATE = "bad_state"          # request not valid in the job's state (cancel a finished job)
    TIMEOUT = "timeout"              # a peer did not answer in time (client-side)
    INTERNAL = "internal"            # a bug on the answering side; it kept serving


class ProtocolError(Exception):
    """A refused request: carries the code and a sentence for a person.

    Raised by `decode` and by validation; daemons turn it into an `error`
    reply, clients turn an `error` reply back into it.
    """

    def __init__(self, code: ErrorCode, message: str, *, rid: int = 0):
        super().__init__(f"{code.value}: {message}")
        self.code = ErrorCode(code)
        self.message = message
        self.rid = rid
