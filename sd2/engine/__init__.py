"""The speculative decoding engine: one round loop over proposers (see ``proposer.py``)."""
