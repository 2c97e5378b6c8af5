"""Protocol version and the limits every decoder enforces."""

# Bumped on any change a peer of the previous version would misread.
PROTOCOL_VERSION = 1

# A whole message (header plus payload frames) larger than this is refused
# before anything in it is used. Daemons may lower or raise it per process.
DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024 * 1024

# The msgpack header of a message; plans of many thousand slices stay well
# under this, and a hostile length prefix cannot make us allocate more.
MAX_HEADER_BYTES = 16 * 1024 * 1024

# msgpack limits for untrusted input: no string, list or map in a header
# may be longer than this (a plan of 1M slices would be absurd).
MAX_HEADER_ITEMS = 1_000_000

# Clocks are step counts; anything past 2**40 steps is a corrupt message.
MAX_CLOCK = 2**40

# The element types a payload frame may carry. Parameters and gradients
# are float32; the others exist for data frames and tests.
ALLOWED_DTYPES = ("float32", "float64", "float16", "int32", "int64", "uint8")

# Largest request id; 2**63 leaves room for every counter we will ever run.
MAX_RID = 2**63 - 1
