"""Decoding: requests, the three-phase speculative step over a batch of rows, the scheduler, phase timing."""
