"""lookalike for its users: the Python client of a lookalike server (`lookalike.client`)."""
