"""The scheduler's logic as a pure state machine (state.py), apart from its daemon (ps/scheduler.py)."""
